"""CoCa: the loss equals its two terms weighted, the decoder is causal, the contrastive head serves zero-shot
classification, and two-process training lowers the loss."""

from __future__ import annotations

import pytest
import torch

from contrastive.config import LossConfig, ModelConfig
from contrastive.dist import LocalCollectives
from contrastive.eval.zeroshot import build_classifier
from contrastive.losses import build_loss
from contrastive.losses.cappa import caption_loss
from contrastive.losses.clip import clip_loss
from contrastive.models import build_model, build_tokenizer
from contrastive.types import Batch

VISION = dict(image_size=28, patch_size=7, width=32, layers=1, head_width=16, mlp_ratio=2.0,
              attn_pooler_queries=8, attn_pooler_heads=2)
TEXT = dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=1)


def tiny_coca() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="coca", embed_dim=32, vision=VISION, text=TEXT,
                                   decoder=dict(width=32, heads=2, layers=1)))


def test_coca_loss_equals_its_weighted_terms():
    model = tiny_coca()
    tokenizer = build_tokenizer(model.cfg)
    images = torch.randn(4, 3, 28, 28)
    tokens = tokenizer(["a photo of a bag.", "a coat", "a sandal on a table.", "an ankle boot"])
    output = model(images, tokens)
    result = build_loss(LossConfig(name="coca", clip_weight=0.3, caption_weight=1.7))(
        output, Batch(images, tokens), LocalCollectives())
    contrastive, _ = clip_loss(output.image_features, output.text_features, output.logit_scale, LocalCollectives())
    captioning, _ = caption_loss(output.caption_logits, output.caption_targets)
    assert result.loss.item() == pytest.approx((0.3 * contrastive + 1.7 * captioning).item(), rel=1e-6)
    assert result.metrics["contrastive_loss"].item() == pytest.approx(contrastive.item(), rel=1e-6)
    assert result.metrics["caption_loss"].item() == pytest.approx(captioning.item(), rel=1e-6)
    assert set(result.metrics) >= {"i2t_accuracy", "token_accuracy", "logit_scale"}


def test_outputs_targets_and_every_parameter_trains():
    model = tiny_coca()
    tokens = build_tokenizer(model.cfg)(["a photo of a bag.", "a coat"])
    output = model(torch.randn(2, 3, 28, 28), tokens)
    assert output.caption_logits.shape == (2, 11, 49408)
    assert torch.equal(output.caption_targets, tokens[:, 1:].masked_fill(tokens[:, 1:] == 0, -100))
    assert torch.allclose(output.image_features.norm(dim=-1), torch.ones(2))
    build_loss(LossConfig(name="coca"))(output, Batch(torch.empty(2, 0), tokens), LocalCollectives()).loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []  # DDP needs every gradient


def test_caption_decoder_is_causal():
    model = tiny_coca().eval()
    images = torch.randn(1, 3, 28, 28)
    tokens = torch.randint(1, 49000, (1, 12), generator=torch.Generator().manual_seed(0))
    memory = model.encode_image_tokens(images)
    base = model.decode(memory, tokens)
    altered = tokens.clone()
    altered[0, 5] += 1
    logits = model.decode(memory, altered)
    torch.testing.assert_close(logits[:, :5], base[:, :5], rtol=0, atol=1e-6)
    assert (logits[:, 5:] - base[:, 5:]).abs().amax(dim=-1).gt(1e-6).all()


def test_contrastive_head_builds_a_zero_shot_classifier():
    model = tiny_coca().eval()
    classifier = build_classifier(model, build_tokenizer(model.cfg), ["bag", "coat"], ["a photo of a {c}."],
                                  torch.device("cpu"))
    assert classifier.shape == (2, 32)


def test_decoder_width_must_match_embed_dim_and_text_width():
    with pytest.raises(ValueError, match="model.decoder.width=16 must equal model.embed_dim=32"):
        build_model(ModelConfig(arch="coca", embed_dim=32, vision=VISION, text=TEXT, decoder=dict(width=16)))
    with pytest.raises(ValueError, match="model.text.width=32 must equal model.decoder.width=64"):
        build_model(ModelConfig(arch="coca", embed_dim=64, vision=VISION, text=TEXT, decoder=dict(width=64)))


def test_settings_coca_would_ignore_are_refused():
    with pytest.raises(ValueError, match="model.init_logit_bias is SigLIP's learnable bias; model.arch=coca has none"):
        build_model(ModelConfig(arch="coca", embed_dim=32, vision=VISION, text=TEXT, init_logit_bias=-10.0,
                                decoder=dict(width=32, heads=2, layers=1)))
    with pytest.raises(ValueError, match="loss.block_size applies to loss=clip and loss=siglip; loss=coca"):
        build_loss(LossConfig(name="coca", block_size=256))
