"""SigLIP-architecture towers: the model configs have SigLIP's shapes (So400m/14 counted on the meta device), the
recipes build them with SigLIP's temperature and bias, and a demo_siglip run exports a SiglipVisionModel that
transformers' Auto classes load offline, whose processor and tower equal our eval preprocessing and tower on a
real photo, and whose patch tokens from a chosen block feed the connectors."""

from __future__ import annotations

import json
import math
import sys

import open_clip
import pytest
import torch
import transformers
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision.transforms.v2 import functional

from contrastive.cli.export import main as export_main
from contrastive.connectors import build_connector
from contrastive.encoders import load_encoder
from contrastive.export import load_vision_encoder
from contrastive.export.hf_towers import siglip_vision
from contrastive.models import build_model
from contrastive.models.towers import tower_configs
from tests.conftest import compose_config, run

TOLERANCE = 1e-5


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= TOLERANCE


def real_photo() -> Image.Image:
    """scikit-learn's bundled photograph (640x427, a temple in China): a real, non-square image, offline."""
    return Image.fromarray(load_sample_image("china.jpg"))


# Published shapes (Zhai et al. 2023; Alabdulmohsin et al. 2023 for So400m) as SiglipVisionConfig fields.
SIGLIP_SHAPES = {
    "siglip_vit_b16": {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072,
                       "num_attention_heads": 12, "patch_size": 16, "image_size": 224},
    "siglip_so400m14": {"hidden_size": 1152, "num_hidden_layers": 27, "intermediate_size": 4304,
                        "num_attention_heads": 16, "patch_size": 14, "image_size": 224},
}
TEXT_MLP_WIDTH = {"siglip_vit_b16": 3072, "siglip_so400m14": 4304}  # the text towers share the image towers' widths


@pytest.mark.parametrize("option", sorted(SIGLIP_SHAPES))
def test_siglip_model_configs_have_the_published_shapes(option):
    cfg = compose_config([f"model={option}"]).model
    with torch.device("meta"):  # So400m's two towers hold 0.9B parameters; nothing is allocated
        model = build_model(cfg)
    config, _ = siglip_vision(model.visual)  # refuses a class token, a pre-norm or another pool than 'map'
    assert {key: config[key] for key in SIGLIP_SHAPES[option]} == SIGLIP_SHAPES[option]
    assert config["layer_norm_eps"] == 1e-6 and config["vision_use_head"]
    # The text tower is open_clip's SigLIP text tower but for the offline tokenizer's vocabulary.
    reference = open_clip.get_model_config(cfg.open_clip_name)["text_cfg"]
    assert reference["no_causal_mask"] and reference["pool_type"] == "last" and reference["proj_bias"]
    text = model.clip.text
    assert (text.width, len(text.transformer.resblocks), text.heads, text.context_length) == (
        reference["width"], reference["layers"], reference["heads"], reference["context_length"])
    assert text.attn_mask is None and text.pool_type == "last" and text.text_projection.bias is not None
    assert text.ln_final.eps == 1e-6 and text.vocab_size == 49408  # open_clip's BPE, not SigLIP's 32k
    assert text.transformer.resblocks[0].mlp.c_fc.out_features == TEXT_MLP_WIDTH[option]


@pytest.mark.parametrize("experiment", ["demo_siglip", "siglip_vit_b16"])
def test_siglip_recipes_use_siglip_towers_with_log10_scale_and_bias_minus_10(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    _, vision, text = tower_configs(OmegaConf.to_object(cfg.model))
    assert cfg.loss.name == "siglip" and vision["timm_pool"] == "map" and vision["timm_proj"] == "none"
    assert text["no_causal_mask"] and text["pool_type"] == "last" and text["proj_bias"]
    assert text["norm_kwargs"]["eps"] == 1e-6 and not text.get("hf_tokenizer_name")
    assert cfg.model.init_logit_scale == pytest.approx(math.log(10), abs=1e-6) and cfg.model.init_logit_bias == -10


def test_clip_recipes_keep_clip_towers():
    for experiment in ("demo", "coca_vit_b16", "cappa_vit_b16"):
        vision = compose_config([f"experiment={experiment}"]).model.vision
        assert "timm_model_name" not in vision and "timm_pool" not in vision, experiment
    model = build_model(compose_config(["experiment=demo"]).model)
    assert model.visual.class_embedding is not None and model.visual.pool_type == "tok"


def test_a_timm_tower_refuses_an_image_size_it_does_not_take():
    cfg = compose_config(["model=tiny_siglip", "model.vision.image_size=56"]).model
    with pytest.raises(ValueError, match="image_size=56 but the timm tower 'vit_tiny_patch7_siglip_28' takes"):
        build_model(cfg)


@pytest.fixture(scope="module")
def siglip_run(demo_root, tmp_path_factory):
    """experiment=demo_siglip for 4 steps of 16 on the demo shards, one process."""
    run_dir = tmp_path_factory.mktemp("siglip") / "run"
    result = run([sys.executable, "-m", "contrastive.cli.train", "experiment=demo_siglip", "debug=tiny",
                  f"data.sources.0.shards={demo_root / 'train'}", f"run_dir={run_dir}",
                  "trainer.threads_per_process=1"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def siglip_export(siglip_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("siglip_hf") / "hf"
    assert export_main(["--checkpoint", str(siglip_run), "--format", "transformers", "--out", str(out)]) == 0
    return out


def test_demo_siglip_exports_a_siglip_vision_model_the_auto_classes_load_offline(siglip_export):
    assert json.loads((siglip_export / "config.json").read_text())["architectures"] == ["SiglipVisionModel"]
    model = transformers.AutoModel.from_pretrained(siglip_export, local_files_only=True)
    processor = transformers.AutoImageProcessor.from_pretrained(siglip_export, local_files_only=True)
    assert type(model) is transformers.SiglipVisionModel and model.config.vision_use_head
    assert processor.crop_size == {"height": 28, "width": 28} and list(processor.image_mean) == [0.5, 0.5, 0.5]
    card = (siglip_export / "README.md").read_text()
    assert "`SiglipVisionModel` (siglip_vision_model), 4 layers, width 128" in card
    assert "rounded half to even" in card and "4k + 3 pixels" in card


def test_transformers_processor_and_model_equal_our_preprocessing_and_tower_on_a_real_photo(siglip_run,
                                                                                            siglip_export):
    ours = load_encoder(siglip_run)
    model = transformers.AutoModel.from_pretrained(siglip_export, local_files_only=True).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(siglip_export, local_files_only=True)
    photo = real_photo()  # 640x427 -> 41x28 -> centre crop 28x28: a resize and a crop both happen
    with torch.no_grad():
        pixels = processor(images=photo, return_tensors="pt")["pixel_values"]
        theirs = model(pixel_values=pixels)
        our_pixels = ours.preprocess.transform()(photo)[None]
        assert close(pixels, our_pixels)
        assert close(theirs.pooler_output, ours.model.visual(our_pixels))
        assert close(theirs.last_hidden_state, ours.model.visual.trunk.forward_features(our_pixels))
        # load_encoder reads the export back as an image encoder with the same features.
        exported = load_encoder(siglip_export)
        assert close(exported.model.encode_image(pixels), ours.model.encode_image(our_pixels))


def test_processor_centre_crop_differs_from_ours_only_as_the_model_card_says(siglip_run, siglip_export):
    processor = transformers.AutoImageProcessor.from_pretrained(siglip_export, local_files_only=True)
    ours = load_encoder(siglip_run).preprocess.transform()
    mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
    # Resized longer side 41 = 28 + 13 (4k + 1: the same crop), then 31 = 28 + 3 (4k + 3: one pixel further left).
    for width, side, same_as_ours in ((640, 41, True), (473, 31, False)):
        photo = real_photo().crop((0, 0, width, 427))
        theirs = processor(images=photo, return_tensors="pt")["pixel_values"][0]
        # The card's rule, computed directly: torchvision's resize, then a crop starting at floor((side - 28) / 2).
        scaled = functional.resize(functional.pil_to_tensor(photo), 28, antialias=True,
                                   interpolation=functional.InterpolationMode.BICUBIC)
        left = (side - 28) // 2
        assert scaled.shape[-1] == side
        assert close(theirs, (scaled[:, :, left:left + 28].float() / 255 - mean) / std)
        assert close(theirs, ours(photo)) == same_as_ours


def test_patch_tokens_from_a_chosen_block_equal_transformers_hidden_states_and_feed_every_connector(
        siglip_run, siglip_export, tmp_path):
    assert export_main(["--checkpoint", str(siglip_run), "--format", "bundle", "--out", str(tmp_path)]) == 0
    model = transformers.AutoModel.from_pretrained(siglip_export, local_files_only=True).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(siglip_export, local_files_only=True)
    pixels = processor(images=real_photo(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = model(pixel_values=pixels, output_hidden_states=True)
        for feature_layer in (1, -2, -1):  # transformers' hidden_states index: after block 1, penultimate, last
            encoder = load_vision_encoder(tmp_path, feature_layer=feature_layer)
            out = encoder(pixels)
            assert close(out.patch_tokens, reference.hidden_states[feature_layer]), feature_layer
            assert close(out.pooled, reference.pooler_output)  # the attention-pool head's output
    assert (encoder.num_patches, encoder.hidden_size) == (16, 128)
    for name, options, tokens_out in (("mlp", {}, 16), ("attention_pool", {"num_queries": 8}, 8),
                                      ("patch_merger", {}, 4)):
        connector = build_connector(name, encoder.hidden_size, 48, **options)
        assert connector(out.patch_tokens).shape == (1, tokens_out, 48), name


def test_open_clip_export_of_demo_siglip_loads_once_our_timm_tower_is_registered(siglip_run, tmp_path):
    assert export_main(["--checkpoint", str(siglip_run), "--format", "open_clip", "--out", str(tmp_path)]) == 0
    assert "import contrastive.models  # registers the timm tower" in (tmp_path / "README.md").read_text()
    loaded = open_clip.create_model(f"local-dir:{tmp_path}").eval()  # this process imported contrastive.models
    ours = load_encoder(siglip_run).model
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), ours.clip.encode_image(images))
        assert torch.equal(loaded.logit_bias, ours.clip.logit_bias)
