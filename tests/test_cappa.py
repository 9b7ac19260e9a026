"""CapPa: what the decoder sees in parallel and autoregressive mode (through outputs and gradients), targets,
per-example mode sampling, the loss formula, config errors, and two-process training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from contrastive.config import LossConfig, ModelConfig
from contrastive.dist import LocalCollectives
from contrastive.losses import build_loss
from contrastive.models import build_model
from contrastive.types import Batch

VISION = dict(image_size=28, patch_size=7, width=32, layers=1, head_width=16, mlp_ratio=2.0, pool_type="avg")
TEXT = dict(context_length=12, vocab_size=100)


def tiny_cappa(parallel_prob: float, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    decoder = dict(width=32, layers=2, heads=2, mlp_ratio=2.0, parallel_prob=parallel_prob)
    return build_model(ModelConfig(arch="cappa", embed_dim=32, vision=VISION, text=TEXT, decoder=decoder))


def captions(batch: int, seed: int = 1) -> torch.Tensor:
    """(B, 12) full-length token rows (no padding), ids 1..99, so every position is an input and a target."""
    return torch.randint(1, 100, (batch, 12), generator=torch.Generator().manual_seed(seed))


def test_targets_are_the_next_caption_tokens_with_padding_ignored():
    model = tiny_cappa(0.0).eval()
    tokens = torch.tensor([[98, 5, 6, 7, 99, 0, 0, 0, 0, 0, 0, 0]])
    output = model(torch.randn(1, 3, 28, 28), tokens)
    assert output.caption_logits.shape == (1, 11, 100)
    assert output.caption_targets.tolist() == [[5, 6, 7, 99] + [-100] * 7]


def test_parallel_mode_sees_no_caption_token():
    model = tiny_cappa(1.0).train()
    images, tokens = torch.randn(3, 3, 28, 28), captions(3)
    first = model(images, tokens).caption_logits
    second = model(images, captions(3, seed=2)).caption_logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    first.sum().backward()
    assert model.decoder.token_embedding.weight.grad.abs().max() == 0
    assert model.decoder.mask_embedding.grad.abs().max() > 0


def test_parallel_mode_attends_fully_over_positions():
    """Each output depends on every position's embedding (full attention), unlike teacher forcing."""
    model = tiny_cappa(1.0).train()
    logits = model(torch.randn(1, 3, 28, 28), captions(1)).caption_logits
    position_grad = torch.autograd.grad(logits[0, 0].sum(), model.decoder.positional_embedding)[0]  # (L, D)
    assert (position_grad[:11].abs().sum(dim=1) > 0).all()


def test_autoregressive_position_depends_only_on_earlier_tokens():
    """Logits at position t (which predict caption token t + 1) change with tokens 0..t and with nothing later."""
    model = tiny_cappa(0.0).train()
    images, tokens = torch.randn(2, 3, 28, 28), captions(2)
    base = model(images, tokens).caption_logits  # (2, 11, V)
    for changed in (0, 4, 10):
        altered = tokens.clone()
        altered[:, changed] = altered[:, changed] % 99 + 1
        logits = model(images, altered).caption_logits
        torch.testing.assert_close(logits[:, :changed], base[:, :changed], rtol=0, atol=0)
        assert (logits[:, changed:] - base[:, changed:]).abs().amax(dim=-1).gt(1e-6).all()


def test_autoregressive_gradient_reaches_only_earlier_token_embeddings():
    model = tiny_cappa(0.0).train()
    tokens = torch.arange(1, 13)[None]  # a distinct token id per position
    logits = model(torch.randn(1, 3, 28, 28), tokens).caption_logits
    grad = torch.autograd.grad(logits[0, 5].sum(), model.decoder.token_embedding.weight)[0]
    reached = grad.abs().sum(dim=1).nonzero().flatten().tolist()
    assert reached == tokens[0, :6].tolist()


def test_each_example_draws_its_mode_from_the_model_generator():
    model = tiny_cappa(0.5).train()
    images, tokens = torch.randn(64, 3, 28, 28), captions(64)

    def parallel_rows(seed: int, global_seed: int = 0) -> torch.Tensor:
        torch.manual_seed(global_seed)  # not what the draw follows
        model.randomness.place(torch.device("cpu"), seed)
        first = model(images, tokens).caption_logits
        model.randomness.place(torch.device("cpu"), seed)
        second = model(images, captions(64, seed=7)).caption_logits
        return (first - second).abs().amax(dim=(1, 2)) == 0  # unchanged by the tokens: parallel

    rows = parallel_rows(3)
    assert torch.equal(rows, parallel_rows(3, global_seed=1))
    assert not torch.equal(rows, parallel_rows(4))
    assert 16 <= int(rows.sum()) <= 48  # Binomial(64, 0.5): outside this with probability < 1e-4


def test_eval_mode_uses_teacher_forcing():
    model = tiny_cappa(1.0).eval()
    images = torch.randn(2, 3, 28, 28)
    assert not torch.equal(model(images, captions(2)).caption_logits, model(images, captions(2, seed=2)).caption_logits)


def test_cappa_loss_is_per_example_token_mean_then_batch_mean():
    logits = torch.randn(2, 4, 7)
    targets = torch.tensor([[1, 2, -100, -100], [3, 4, 5, 6]])
    from contrastive.types import ModelOutput

    result = build_loss(LossConfig(name="cappa"))(ModelOutput(caption_logits=logits, caption_targets=targets),
                                                  Batch(torch.empty(2, 0), torch.empty(2, 0)), LocalCollectives())
    first = F.cross_entropy(logits[0, :2], targets[0, :2])
    second = F.cross_entropy(logits[1], targets[1])
    assert result.loss.item() == pytest.approx(((first + second) / 2).item(), rel=1e-6)
    assert set(result.metrics) == {"caption_loss", "token_accuracy"}


def test_captioning_loss_rejects_a_two_tower_model_output():
    from contrastive.types import ModelOutput

    with pytest.raises(ValueError, match="loss=cappa needs a captioning model"):
        build_loss(LossConfig(name="cappa"))(ModelOutput(), Batch(torch.empty(1, 0), torch.empty(1, 0)),
                                             LocalCollectives())


@pytest.mark.parametrize(("decoder", "embed_dim", "message"), [
    ({"width": 32, "heads": 2, "depth": 2}, 32, "model.decoder has unknown key"),
    ({"width": 32, "heads": 2, "parallel_prob": 1.5}, 32, "parallel_prob must be within"),
    ({"width": 32, "heads": 3}, 32, "not divisible by model.decoder.heads"),
    ({"width": 32, "heads": 2}, 64, "model.embed_dim=64 must equal model.vision.width=32"),
])
def test_config_mistakes_fail_clearly(decoder, embed_dim, message):
    with pytest.raises(ValueError, match=message):
        build_model(ModelConfig(arch="cappa", embed_dim=embed_dim, vision=VISION, text=TEXT, decoder=decoder))


def test_model_config_reads_parallel_prob_from_the_loss_config():
    from omegaconf import OmegaConf

    from tests.conftest import compose_config

    cfg = compose_config(["model=tiny_cappa", "loss=cappa", "loss.parallel_prob=0.3"])
    assert build_model(OmegaConf.to_object(cfg.model)).parallel_prob == 0.3


def test_settings_cappa_would_ignore_are_refused():
    with pytest.raises(ValueError, match="model.init_logit_bias is SigLIP's learnable bias; model.arch=cappa has none"):
        build_model(ModelConfig(arch="cappa", embed_dim=32, vision=VISION, text=TEXT, init_logit_bias=-10.0,
                                decoder=dict(width=32, layers=1, heads=2)))
    with pytest.raises(ValueError, match="loss.block_size applies to loss=clip and loss=siglip; loss=cappa"):
        build_loss(LossConfig(name="cappa", block_size=256))
