"""Towers take smaller images and shorter texts with their parameters at the built size (contrastive.models.input_size):
each against a tower built at the smaller size by open_clip or timm, holding the resampled or sliced weights."""

from __future__ import annotations

import open_clip
import timm
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from timm.layers import resample_abs_pos_embed

from contrastive.models import build_model
from contrastive.models.input_size import resampled_position_embedding
from tests.conftest import compose_config

CAPTIONS = ["a photo of a sneaker.", "a bag.", "a black and white picture of a pullover."]


def _tiny_model(*overrides: str):
    torch.manual_seed(0)
    return build_model(compose_config(["model=test_tiny", *overrides]).model).eval()


def test_position_embedding_resampling_matches_timm():
    embedding = torch.randn(1 + 8 * 8, 16)
    for grid in [(4, 4), (6, 6), (12, 12), (8, 8)]:
        expected = resample_abs_pos_embed(embedding[None], new_size=list(grid), old_size=[8, 8],
                                          num_prefix_tokens=1)[0]
        torch.testing.assert_close(resampled_position_embedding(embedding, (8, 8), grid), expected)


def test_open_clip_vision_tower_at_a_smaller_size_equals_one_built_at_that_size():
    model = _tiny_model("model.vision.image_size=28")
    images = torch.randn(3, 3, 14, 14)
    vision = CLIPVisionCfg(**{**model.cfg.vision, "image_size": 14})
    reference = open_clip.CLIP(model.embed_dim, vision, CLIPTextCfg(**model.cfg.text)).eval()
    state = model.clip.state_dict()
    state["visual.positional_embedding"] = resample_abs_pos_embed(
        state["visual.positional_embedding"][None], new_size=[2, 2], old_size=[4, 4], num_prefix_tokens=1)[0]
    reference.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images, normalize=False), reference.encode_image(images))
        full = torch.randn(2, 3, 28, 28)  # at the built size the tower is open_clip's own forward
        torch.testing.assert_close(model.encode_image(full, normalize=False), model.clip.encode_image(full))
    assert model.clip.visual.positional_embedding.shape == (17, 32)  # parameters keep their size


def test_text_tower_at_a_shorter_length_equals_one_built_at_that_length():
    model = _tiny_model()
    short = open_clip.SimpleTokenizer(context_length=8)(CAPTIONS)  # the longest caption is cut, ending in its EOT
    reference = open_clip.CLIP(model.embed_dim, CLIPVisionCfg(**model.cfg.vision),
                               CLIPTextCfg(**{**model.cfg.text, "context_length": 8})).eval()
    state = model.clip.state_dict()
    state["positional_embedding"] = state["positional_embedding"][:8]
    reference.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(short, normalize=False), reference.encode_text(short))


def test_captions_padded_to_their_longest_give_the_features_of_full_padding():
    """What length bucketing relies on: a causal tower pooled at the EOT token ignores the padding after it."""
    model = _tiny_model()
    full = open_clip.SimpleTokenizer(context_length=16)(CAPTIONS[:2])
    longest = int((full != 0).sum(1).max())
    assert longest < 16
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(full[:, :longest]), model.encode_text(full))


def test_timm_vision_tower_at_a_smaller_size_equals_one_built_at_that_size():
    model = _tiny_model("model=timm_vit_tiny", "model.embed_dim=32")
    trunk = model.clip.visual.trunk
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=112,
                                  global_pool="token").eval()
    state = {k: v for k, v in trunk.state_dict().items() if k in reference.state_dict()}
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=[7, 7], old_size=[14, 14],
                                                num_prefix_tokens=1)
    reference.load_state_dict(state)
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(trunk.forward_features(images), reference.forward_features(images))
        assert model.encode_image(images).shape == (2, 32)
