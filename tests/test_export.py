"""Exports: transformers towers match ours to 1e-5, open_clip and bundle exports reload exactly, every registered
architecture (CLIP, CapPa, CoCa) exports or is refused as documented, the CLI and the model card work from a real
checkpoint, and zero-shot top-1 is unchanged through CLIPVisionModelWithProjection."""

from __future__ import annotations

import dataclasses
import json
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from torch import nn

from contrastive.cli.export import main as export_main
from contrastive.encoders import load_encoder, preprocess_from_config
from contrastive.eval.zeroshot import ZeroShotClassification
from contrastive.export import EXPORT_FORMATS, VisionEncoder, load_vision_encoder
from contrastive.export.transformers_format import build_hf_vision_model
from contrastive.models import build_model, list_models
from tests.conftest import run, tiny_run_overrides
from tests.export_models import clip_style_config, randomized, registered_model_config, siglip_style_config, tiny_config

TOLERANCE = 1e-5


def our_hidden_states(visual: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output (B, T, D), class token first where there is one."""
    depth = len(visual.transformer.resblocks) if hasattr(visual, "transformer") else len(visual.trunk.blocks)
    out = visual.forward_intermediates(images, indices=list(range(depth)), output_fmt="NLC", intermediates_only=True,
                                       output_extra_tokens=True)
    prefix = out.get("image_intermediates_prefix")
    if prefix is None:
        return out["image_intermediates"]
    return [torch.cat([p, x], dim=1) for p, x in zip(prefix, out["image_intermediates"])]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
def test_transformers_clip_export_matches_our_tower(tmp_path, quick_gelu):
    model = randomized(clip_style_config(quick_gelu))
    exported = EXPORT_FORMATS.get("transformers")(model, tmp_path)
    assert "CLIPVisionModelWithProjection" in exported.architecture
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        hidden = our_hidden_states(model.visual, images)
        ours_pooled = model.visual.ln_post(hidden[-1][:, 0])
        ours_projected = model.visual(images)
        with_projection = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
        assert with_projection.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
        out = with_projection(pixel_values=images, output_hidden_states=True)
        assert close(out.last_hidden_state, hidden[-1])
        assert close(out.hidden_states[-2], hidden[-2])
        assert close(out.image_embeds, ours_projected)
        plain = transformers.CLIPVisionModel.from_pretrained(tmp_path).eval()(pixel_values=images,
                                                                               output_hidden_states=True)
        assert close(plain.last_hidden_state, hidden[-1]) and close(plain.pooler_output, ours_pooled)
        assert close(plain.hidden_states[-2], hidden[-2])


def test_transformers_siglip_export_matches_our_tower(tmp_path):
    model = randomized(siglip_style_config())
    EXPORT_FORMATS.get("transformers")(model, tmp_path)
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        hidden = our_hidden_states(model.visual, images)
        hf = transformers.SiglipVisionModel.from_pretrained(tmp_path).eval()
        assert hf.config.hidden_act == "gelu" and hf.config.layer_norm_eps == 1e-6
        out = hf(pixel_values=images, output_hidden_states=True)
        assert close(out.last_hidden_state, model.visual.trunk.forward_features(images))  # after the final LayerNorm
        assert close(out.hidden_states[-2], hidden[-2])
        assert close(out.pooler_output, model.visual(images))


def test_image_processor_config_matches_our_preprocessing(tmp_path):
    model = randomized(clip_style_config())
    EXPORT_FORMATS.get("transformers")(model, tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    preprocess = preprocess_from_config(model.cfg)
    assert (processor.image_mean == pytest.approx(preprocess.mean)
            and processor.image_std == pytest.approx(preprocess.std))
    assert processor.crop_size["height"] == 28 and int(processor.resample) == 3  # PIL bicubic
    image = Image.fromarray(torch.randint(0, 256, (28, 28), dtype=torch.uint8).numpy()).convert("RGB")
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert close(theirs, preprocess.transform()(image))


@pytest.mark.parametrize("change, reason", [
    ({"vision": {"attentional_pool": True, "attn_pooler_queries": 1, "attn_pooler_heads": 2}}, "attentional pooler"),
    ({"vision": {"pool_type": "avg"}}, "pools by 'avg'"),
    ({"vision": {"no_ln_pre": True}}, "no pre-LN"),
    ({"vision": {"qk_norm": True}}, "custom attention blocks"),
    ({"vision": {"image_size": 28, "timm_model_name": "vit_export_test_siglip", "timm_pool": "map",
                 "timm_proj": "linear"}}, "timm_proj=none"),
    ({"vision": {"image_size": 28, "timm_model_name": "vit_export_test_siglip", "timm_pool": "avg",
                 "timm_proj": "none"}}, "pools by 'avg'"),
])
def test_towers_transformers_cannot_express_are_refused(change, reason):
    with pytest.raises(ValueError, match=reason):
        build_hf_vision_model(build_model(tiny_config(**change)).visual)


@pytest.mark.parametrize("make_config", [clip_style_config, siglip_style_config], ids=["clip", "siglip"])
def test_open_clip_export_round_trips_exactly(tmp_path, make_config):
    model = randomized(make_config())
    EXPORT_FORMATS.get("open_clip")(model, tmp_path)
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    loaded.eval()
    images, tokens = torch.randn(2, 3, 28, 28), torch.randint(1, 1000, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.clip.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), model.clip.encode_text(tokens))
        assert torch.equal(loaded.logit_scale, model.clip.logit_scale)
        if model.clip.logit_bias is not None:
            assert torch.equal(loaded.logit_bias, model.clip.logit_bias)
    normalize = preprocess.transforms[-1]
    assert list(normalize.mean) == pytest.approx(model.cfg.image_mean)
    assert open_clip.get_tokenizer(f"local-dir:{tmp_path}")(["a photo"]).shape == (1, 16)


@pytest.mark.parametrize("make_config", [clip_style_config, siglip_style_config], ids=["clip", "siglip"])
def test_bundle_reloads_bit_exactly(tmp_path, make_config):
    model = randomized(make_config())
    EXPORT_FORMATS.get("bundle")(model, tmp_path)
    encoder = load_vision_encoder(tmp_path)
    reference = VisionEncoder(model.visual, preprocess_from_config(model.cfg))
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ours, reloaded = reference(images), encoder(images)
        hidden = our_hidden_states(model.visual, images)
        pooled = model.visual(images)
        first_block = load_vision_encoder(tmp_path, feature_layer=1)(images).patch_tokens
    assert torch.equal(reloaded.patch_tokens, ours.patch_tokens) and torch.equal(reloaded.pooled, ours.pooled)
    # Default: the penultimate block's spatial tokens (class token dropped), as LLaVA selects them.
    penultimate = hidden[-2][:, 1:] if make_config is clip_style_config else hidden[-2]
    assert reloaded.patch_tokens.shape == (2, 16, 32) and torch.equal(reloaded.patch_tokens, penultimate)
    assert close(reloaded.pooled, pooled)  # the image embedding the contrastive head saw, up to kernel choice
    assert (encoder.preprocess == preprocess_from_config(model.cfg)
            and (encoder.num_patches, encoder.hidden_size) == (16, 32))
    assert torch.equal(first_block, hidden[0][:, -16:])
    with pytest.raises(ValueError, match="feature_layer=4 is outside"):
        load_vision_encoder(tmp_path, feature_layer=4)


class HFImageTower(nn.Module):
    """Zero-shot through transformers: CLIPVisionModelWithProjection for images, our text tower for prompts."""

    def __init__(self, hf_model: nn.Module, ours: nn.Module) -> None:
        super().__init__()
        self.hf_model, self.ours = hf_model, ours

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.hf_model(pixel_values=images).image_embeds
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.ours.encode_text(tokens, normalize=normalize)


@pytest.fixture(scope="module")
def trained_run(demo_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    result = run([sys.executable, "-m", "contrastive.cli.train", *tiny_run_overrides(demo_root, run_dir)],
                 timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir / "zeroshot.json").write_text(json.dumps(
        {"dataset": "fashion-mnist", "task": "zeroshot_classification", "metrics": {"acc1": 0.25}}))
    return run_dir


def test_cli_exports_every_format_with_a_model_card(trained_run, tmp_path):
    for name in ("transformers", "open_clip", "bundle"):
        out = tmp_path / name
        assert export_main(["--checkpoint", str(trained_run), "--format", name, "--out", str(out)]) == 0
        card = (out / "README.md").read_text()
        assert "| steps | 4 |" in card and "zeroshot_classification on fashion-mnist" in card and "acc1 0.25" in card
    assert export_main(["--checkpoint", str(trained_run), "--format", "bundle", "--out", str(tmp_path / "bundle")]) == 2


def test_zero_shot_top1_unchanged_through_transformers(trained_run, demo_root, tmp_path):
    encoder = load_encoder(trained_run)
    assert export_main(["--checkpoint", str(trained_run), "--format", "transformers", "--out", str(tmp_path)]) == 0
    hf_model = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
    evaluator = ZeroShotClassification(None, demo_root, "test", batch_size=128)
    before = evaluator.run(encoder, torch.device("cpu"))
    after = evaluator.run(dataclasses.replace(encoder, model=HFImageTower(hf_model, encoder.model)),
                          torch.device("cpu"))
    assert after["acc1"] == before["acc1"] and after["acc5"] == before["acc5"]


# What each architecture's image tower exports to: the transformers refusal reason, or None when it maps.
# siglip_locca's image tower is a timm SigLIP tower: a SiglipVisionModel (its parity in detail: tests/test_siglip.py)
TRANSFORMERS_REFUSAL = {"clip": None, "cappa": "pools by 'avg'", "coca": "attentional pooler", "siglip_locca": None}
OPEN_CLIP_MODULE = {"clip": "clip", "cappa": None, "coca": "coca", "siglip_locca": None}


@pytest.mark.parametrize("arch", list_models())
def test_every_registered_architecture_exports(tmp_path, arch):
    assert arch in TRANSFORMERS_REFUSAL, f"say what model.arch={arch} exports to in TRANSFORMERS_REFUSAL"
    model = randomized(registered_model_config(arch))
    size = preprocess_from_config(model.cfg).image_size
    images, tokens = torch.randn(2, 3, size, size), torch.randint(1, 1000, (2, 16))
    for name in ("bundle", "hf", "oc"):
        (tmp_path / name).mkdir()

    EXPORT_FORMATS.get("bundle")(model, tmp_path / "bundle")
    with torch.no_grad():
        reference, reloaded = (VisionEncoder(model.visual, preprocess_from_config(model.cfg))(images),
                               load_vision_encoder(tmp_path / "bundle")(images))
    assert torch.equal(reloaded.patch_tokens, reference.patch_tokens) and torch.equal(reloaded.pooled, reference.pooled)

    if TRANSFORMERS_REFUSAL[arch] is None:
        hf = build_hf_vision_model(model.visual)
        with torch.no_grad():
            output = hf(pixel_values=images)  # CLIPVisionModelWithProjection, or SiglipVisionModel (no projection)
            pooled = output.image_embeds if hasattr(output, "image_embeds") else output.pooler_output
            reference = model.visual(images)
        # 1e-5 relative to the output's size: the randomised SigLIP head's outputs reach ~70, where fp32 rounding alone
        # is ~1e-5 absolute
        scale = max(1.0, reference.abs().max().item())
        assert pooled.shape == reference.shape and (pooled - reference).abs().max().item() <= TOLERANCE * scale
    else:
        with pytest.raises(ValueError, match=TRANSFORMERS_REFUSAL[arch]):
            EXPORT_FORMATS.get("transformers")(model, tmp_path / "hf")

    if OPEN_CLIP_MODULE[arch] is None:
        with pytest.raises(ValueError, match="no open_clip counterpart"):
            EXPORT_FORMATS.get("open_clip")(model, tmp_path / "oc")
        return
    EXPORT_FORMATS.get("open_clip")(model, tmp_path / "oc")
    loaded = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    ours = getattr(model, OPEN_CLIP_MODULE[arch])
    with torch.no_grad():
        theirs, expected = loaded(images, tokens), ours(images, tokens)
    for key in ("image_features", "text_features", "logits"):
        if key in expected:
            assert torch.equal(theirs[key], expected[key]), key
