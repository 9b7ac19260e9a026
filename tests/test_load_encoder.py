"""load_encoder: each kind (our checkpoint, an open_clip directory or name + weights, a transformers directory) gives
the features of the model that was saved, computed independently (the in-memory model, or transformers' own
class), with the preprocessing and tokenizer that model expects; a missing or unknown path is one clear line."""

from __future__ import annotations

import dataclasses
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers

from contrastive.checkpoint_io import checkpoint_path
from contrastive.encoders import encoder_from_model, load_encoder
from contrastive.eval.zeroshot import ZeroShotClassification
from contrastive.export import EXPORT_FORMATS
from contrastive.train.checkpoint import save_checkpoint
from tests.export_models import clip_style_config, randomized, siglip_style_config

TOLERANCE = 1e-5
# conf/model/test_tiny.yaml, written out so a loader that read the wrong statistics is caught.
TINY_MEAN, TINY_STD = [0.2860] * 3, [0.3530] * 3
TEXTS = ["a photo of a bag.", "an ankle boot"]
CONFIGS = {"clip": clip_style_config, "siglip": siglip_style_config}


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 28, 28, generator=generator), open_clip.SimpleTokenizer(context_length=16)(TEXTS)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= TOLERANCE


def assert_tiny_preprocess(encoder) -> None:
    assert encoder.preprocess.image_size == 28 and encoder.preprocess.interpolation == "bicubic"
    assert encoder.preprocess.mean == pytest.approx(TINY_MEAN) and encoder.preprocess.std == pytest.approx(TINY_STD)


def assert_same_two_tower(encoder, model) -> None:
    """Features, temperature, bias and tokens of `encoder` are those of our in-memory `model` (its open_clip CLIP)."""
    images, tokens = inputs()
    with torch.no_grad():
        assert close(encoder.model.encode_image(images), F.normalize(model.clip.encode_image(images), dim=-1))
        assert close(encoder.model.encode_text(tokens), F.normalize(model.clip.encode_text(tokens), dim=-1))
        assert close(encoder.model.encode_image(images, normalize=False), model.clip.encode_image(images))
    assert torch.equal(encoder.tokenizer(TEXTS), tokens)
    assert encoder.logit_scale == pytest.approx(model.clip.logit_scale.exp().item(), rel=1e-6)
    bias = model.clip.logit_bias
    assert encoder.logit_bias == (None if bias is None else pytest.approx(bias.item(), rel=1e-6))
    assert encoder.has_text_tower


@pytest.mark.parametrize("arch", CONFIGS)
def test_our_run_directory_and_checkpoint_file(tmp_path, arch):
    cfg = CONFIGS[arch]()
    model = randomized(cfg)
    path = checkpoint_path(tmp_path, 7)
    save_checkpoint({"model": model.state_dict(), "config": {"name": "tiny", "model": dataclasses.asdict(cfg)},
                     "step": 7}, path, keep_last=2)
    for source in (tmp_path, path):
        encoder = load_encoder(source)
        assert (encoder.kind, encoder.name, encoder.source, encoder.run_config["step"]) == ("contrastive", "tiny",
                                                                                            str(path), 7)
        assert not encoder.model.training
        assert_tiny_preprocess(encoder)
        assert_same_two_tower(encoder, model)


@pytest.mark.parametrize("arch", CONFIGS)
def test_open_clip_directory_from_our_exporter(tmp_path, arch):
    model = randomized(CONFIGS[arch]())
    EXPORT_FORMATS.get("open_clip")(model, tmp_path)
    encoder = load_encoder(tmp_path)
    assert (encoder.kind, encoder.name, encoder.source) == ("open_clip", tmp_path.name, str(tmp_path))
    assert_tiny_preprocess(encoder)
    # open_clip's own transform agrees on what the image processor must do.
    _, _, theirs = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    assert list(theirs.transforms[-1].mean) == pytest.approx(encoder.preprocess.mean)
    assert_same_two_tower(encoder, model)


def test_open_clip_name_and_weights_file(tmp_path):
    cfg = clip_style_config()
    model = randomized(cfg)
    config = {"embed_dim": cfg.embed_dim, "vision_cfg": cfg.vision, "text_cfg": cfg.text}
    (tmp_path / "tiny-load-encoder-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-load-encoder-clip.json")
    weights = tmp_path / "weights.pt"
    torch.save({k.removeprefix("clip."): v for k, v in model.state_dict().items()}, weights)
    encoder = load_encoder(weights, open_clip_name="tiny-load-encoder-clip")
    assert (encoder.kind, encoder.name, encoder.source) == ("open_clip", "tiny-load-encoder-clip", str(weights))
    # A named open_clip config records no statistics of its own: open_clip's (OpenAI's) defaults apply.
    assert encoder.preprocess.image_size == 28
    assert encoder.preprocess.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert_same_two_tower(encoder, model)


@pytest.mark.parametrize("arch, hf_class, output", [
    ("clip", "CLIPVisionModelWithProjection", "image_embeds"),
    ("siglip", "SiglipVisionModel", "pooler_output"),
])
def test_transformers_export_is_an_image_only_encoder(tmp_path, demo_root, arch, hf_class, output):
    model = randomized(CONFIGS[arch]())
    EXPORT_FORMATS.get("transformers")(model, tmp_path)
    encoder = load_encoder(tmp_path)
    assert (encoder.kind, encoder.name, encoder.tokenizer, encoder.logit_scale) == ("transformers", tmp_path.name,
                                                                                   None, None)
    assert not encoder.has_text_tower
    assert_tiny_preprocess(encoder)
    images, _ = inputs()
    with torch.no_grad():
        theirs = getattr(getattr(transformers, hf_class).from_pretrained(tmp_path).eval()(pixel_values=images), output)
        ours = encoder.model.encode_image(images)
        assert close(ours, F.normalize(theirs, dim=-1))
        assert close(ours, F.normalize(model.visual(images), dim=-1))  # the tower that was exported
    with pytest.raises(ValueError, match=f"zero-shot classification needs a text tower .*{tmp_path.name}.* image-only"):
        ZeroShotClassification("fm", demo_root, "test").run(encoder, torch.device("cpu"))


def test_transformers_clip_model_directory(tmp_path):
    """A whole CLIPModel as transformers saves it: the projected image embedding and the temperature."""
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 7},
        projection_dim=24, logit_scale_init_value=3.0)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(tmp_path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                    image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=2,
                                    ).save_pretrained(tmp_path)
    encoder = load_encoder(tmp_path)
    assert (encoder.preprocess.image_size, encoder.preprocess.mean, encoder.preprocess.std,
            encoder.preprocess.interpolation) == (28, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], "bilinear")
    assert encoder.logit_scale == pytest.approx(torch.tensor(3.0).exp().item())
    assert encoder.tokenizer is None  # no tokenizer files saved: the text tower cannot be fed
    images, _ = inputs()
    reference = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = reference.vision_model(pixel_values=images).pooler_output @ reference.visual_projection.weight.T
        assert close(encoder.model.encode_image(images), F.normalize(expected, dim=-1))


def test_evaluator_gives_the_same_metrics_through_an_open_clip_export(tmp_path, demo_root):
    """The preprocessing travels with the encoder: zero-shot on the demo data is unchanged by the round trip."""
    model = randomized(clip_style_config())
    EXPORT_FORMATS.get("open_clip")(model, tmp_path)
    evaluator = ZeroShotClassification("fm", demo_root, "test", batch_size=256)
    before = evaluator.run(encoder_from_model(model), torch.device("cpu"))
    assert evaluator.run(load_encoder(tmp_path), torch.device("cpu")) == pytest.approx(before, abs=1e-6)


def test_missing_and_unknown_paths_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="nope does not exist$"):
        load_encoder(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="is not a model directory this can read") as error:
        load_encoder(tmp_path)
    assert "\n" not in str(error.value)
    (tmp_path / "encoder.json").write_text("{}")
    with pytest.raises(ValueError, match="encoder bundle: use contrastive.export.load_vision_encoder"):
        load_encoder(tmp_path)
    with pytest.raises(ValueError, match="'no-such-model' is not an open_clip model config name"):
        load_encoder(tmp_path / "notes.txt", open_clip_name="no-such-model")
