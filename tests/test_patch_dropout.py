"""Patch dropout (FLIP): fewer patch tokens in training, every token and a deterministic output in eval."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from contrastive.config import ModelConfig
from contrastive.models import build_model
from tests.conftest import compose_config

VISION = dict(image_size=28, patch_size=7, width=32, layers=1, head_width=16, mlp_ratio=2.0)
TEXT = dict(context_length=12, vocab_size=100, width=32, heads=2, layers=1, mlp_ratio=2.0)


def tiny_clip(patch_dropout: float) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="clip", embed_dim=16, vision={**VISION, "patch_dropout": patch_dropout},
                                   text=TEXT))


def tokens_seen_by_transformer(model, images) -> int:
    seen = []
    handle = model.visual.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    model.encode_image(images)
    handle.remove()
    return seen[0]


def test_patches_are_dropped_in_training_only():
    images = torch.randn(2, 3, 28, 28)
    model = tiny_clip(patch_dropout=0.5)
    # 16 patches + the class token; half the patches are dropped, the class token is kept.
    assert tokens_seen_by_transformer(model.train(), images) == 1 + 8
    first, second = model.encode_image(images), model.encode_image(images)
    assert not torch.allclose(first, second)  # a fresh random subset each forward

    assert tokens_seen_by_transformer(model.eval(), images) == 1 + 16
    reference = tiny_clip(patch_dropout=0.0).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images))


def test_patch_dropout_is_a_model_config_switch():
    cfg = compose_config(["model=test_tiny", "+model.vision.patch_dropout=0.25"])
    model = build_model(OmegaConf.to_object(cfg.model)).train()
    assert tokens_seen_by_transformer(model, torch.randn(1, 3, 28, 28)) == 1 + 12
