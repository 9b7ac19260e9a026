"""Model FLOPs per sample (forward + backward, counted once) and the FLOP/s and MFU figures derived from them."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from contrastive.config import LossConfig, ModelConfig
from contrastive.losses import build_loss
from contrastive.models import build_model
from contrastive.train.flops import flops_per_sample, throughput_metrics
from contrastive.types import Batch

VISION = dict(image_size=28, patch_size=7, width=32, layers=2, head_width=16, mlp_ratio=2.0, patch_dropout=0.5)
TEXT = dict(context_length=12, vocab_size=100, width=32, heads=2, layers=2, mlp_ratio=2.0)


def test_counts_forward_and_backward_and_leaves_state_alone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="clip", embed_dim=16, vision=VISION, text=TEXT)).eval()  # no dropout: exact
    batch = Batch(images=torch.randn(8, 3, 28, 28), tokens=torch.randint(1, 100, (8, 12)))
    with FlopCounterMode(display=False) as forward_only:
        model(batch.images[:4], batch.tokens[:4])
    per_sample = flops_per_sample(model, build_loss(LossConfig(name="clip")), batch, samples=4)
    # The backward of a matmul costs two matmuls; the input images need no gradient, so slightly less than 3x.
    assert 2.5 < per_sample / (forward_only.get_total_flops() / 4) <= 3.05
    assert all(p.grad is None for p in model.parameters())

    model.train()
    state = torch.get_rng_state()
    flops_per_sample(model, build_loss(LossConfig(name="clip")), batch)  # patch dropout draws random numbers
    assert torch.equal(torch.get_rng_state(), state)


def test_throughput_metrics():
    assert throughput_metrics(1e9, 100.0, 2, None) == {"flops_per_second_per_device": 5e10}
    assert throughput_metrics(1e9, 100.0, 2, 1e11) == {"flops_per_second_per_device": 5e10, "mfu": 0.5}
