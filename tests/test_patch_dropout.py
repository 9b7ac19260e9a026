"""Patch dropout (FLIP): fewer patch tokens in training, every token and a deterministic output in eval; the
patches kept are drawn from the model's own generator, with open_clip's maths, never from torch's global one."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from open_clip.transformer import PatchDropout as OpenClipPatchDropout

from contrastive.config import ModelConfig
from contrastive.models import build_model
from contrastive.models.randomness import ModelRandomness, PatchDropout
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


def test_kept_patches_follow_the_model_generator_not_the_global_rng():
    model, images = tiny_clip(patch_dropout=0.5).train(), torch.randn(4, 3, 28, 28)

    def features(model_seed: int, global_seed: int) -> torch.Tensor:
        model.randomness.place(torch.device("cpu"), model_seed)
        torch.manual_seed(global_seed)
        with torch.no_grad():
            return model.encode_image(images)

    expected = features(5, global_seed=1)
    global_state = torch.get_rng_state()
    assert torch.equal(features(5, global_seed=2), expected)
    assert not torch.equal(features(6, global_seed=1), expected)
    torch.manual_seed(1)
    features(5, global_seed=1)
    assert torch.equal(torch.get_rng_state(), global_state), "patch dropout drew from the global generator"


@pytest.mark.parametrize("prob", [0.25, 0.5, 0.9])
def test_our_patch_dropout_keeps_what_open_clips_keeps_from_the_same_seed(prob):
    tokens = torch.randn(3, 1 + 16, 8)
    randomness = ModelRandomness()
    randomness.place(torch.device("cpu"), 7)
    ours = PatchDropout(prob, prefix_tokens=1, randomness=randomness)(tokens)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        reference = OpenClipPatchDropout(prob)(tokens)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_a_timm_tower_drops_patches_from_the_model_generator_too():
    model = build_model(ModelConfig(arch="clip", embed_dim=16, text=TEXT, vision=dict(
        timm_model_name="vit_tiny_patch16_224", timm_pool="token", timm_proj="linear", image_size=224,
        patch_dropout=0.5)))
    dropouts = [m for m in model.modules() if "PatchDropout" in type(m).__name__]
    assert len(dropouts) == 1 and isinstance(dropouts[0], PatchDropout)
    assert dropouts[0].randomness is model.randomness and dropouts[0].prefix_tokens == 1
