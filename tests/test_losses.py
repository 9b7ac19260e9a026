"""Every registered loss against a direct formula and open_clip's implementation, in one process and across
torchrun ranks (gloo), for the loss value and its gradients."""

from __future__ import annotations

import json
import math

import open_clip.loss
import pytest
import torch
import torch.nn.functional as F

from contrastive.config import LossConfig
from contrastive.dist import LocalCollectives
from contrastive.losses import build_loss, list_losses
from contrastive.types import Batch, ModelOutput
from tests.conftest import tiny_run_overrides, torchrun

CONTRASTIVE_LOSSES = ["clip", "siglip"]
CAPTIONING_LOSSES = ["cappa", "coca", "siglip_locca"]  # tested in tests/test_cappa.py, test_coca.py, test_locca.py
BLOCK_SIZES = [None, 1, 4, 64]  # None: materialised logits; 4 does not divide the batches below


def _features(batch: int = 6, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(batch, dim, generator=generator), dim=-1),
            F.normalize(torch.randn(batch, dim, generator=generator), dim=-1))


def _call(name: str, images, texts, scale, bias=None, block_size=None):
    output = ModelOutput(image_features=images, text_features=texts, logit_scale=scale, logit_bias=bias)
    batch = Batch(images=torch.empty(len(images), 0), tokens=torch.empty(len(images), 0, dtype=torch.long))
    return build_loss(LossConfig(name=name, block_size=block_size))(output, batch, LocalCollectives())


def test_clip_loss_equals_direct_formula():
    images, texts = _features()
    scale = torch.tensor(7.0)
    logits = scale * images @ texts.T
    expected = 0
    for i in range(len(images)):  # -log softmax of the matching pair, both directions, averaged
        expected += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    expected = expected / (2 * len(images))
    result = _call("clip", images, texts, scale)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(result.metrics) >= {"contrastive_loss", "i2t_accuracy", "logit_scale"}


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_clip_loss_matches_open_clip_with_gradients(block_size):
    images, texts = _features(batch=9, dim=16, seed=3)
    ours = [t.clone().requires_grad_(True) for t in (images, texts, torch.tensor(math.exp(2.0)))]
    theirs = [t.clone().requires_grad_(True) for t in (images, texts, torch.tensor(math.exp(2.0)))]
    result = _call("clip", *ours, block_size=block_size)
    result.loss.backward()
    open_clip.loss.ClipLoss()(*theirs).backward()
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-5, atol=1e-7)
    expected_accuracy = ((images @ texts.T).argmax(dim=1) == torch.arange(9)).float().mean()
    assert result.metrics["i2t_accuracy"].item() == pytest.approx(expected_accuracy.item())


def test_siglip_loss_equals_direct_formula():
    images, texts = _features(batch=7, seed=5)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    expected = 0
    for i in range(len(images)):  # -log sigmoid(z * logit) over every pair, z = +1 only for matching pairs
        for j in range(len(texts)):
            z = 1.0 if i == j else -1.0
            expected += -F.logsigmoid(z * (scale * images[i] @ texts[j] + bias))
    expected = expected / len(images)
    for block_size in BLOCK_SIZES:
        result = _call("siglip", images, texts, scale, bias, block_size=block_size)
        assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert set(result.metrics) >= {"contrastive_loss", "logit_scale", "logit_bias"}


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_siglip_loss_matches_open_clip_with_gradients(block_size):
    images, texts = _features(batch=9, dim=16, seed=4)
    initial = (images, texts, torch.tensor(10.0), torch.tensor(-10.0))
    ours = [t.clone().requires_grad_(True) for t in initial]
    theirs = [t.clone().requires_grad_(True) for t in initial]
    _call("siglip", *ours, block_size=block_size).loss.backward()
    open_clip.loss.SigLipLoss()(*theirs).backward()
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-5, atol=1e-7)


def test_one_process_ring_exchange_returns_its_own_tensors_with_gradients():
    to_next, to_previous = torch.randn(3, 2, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    from_previous, from_next = LocalCollectives().ring_exchange_with_grad(to_next, to_previous)
    (2 * from_previous.sum() + 3 * from_next.sum()).backward()
    torch.testing.assert_close(to_next.grad, torch.full((3, 2), 2.0))
    torch.testing.assert_close(to_previous.grad, torch.full((3, 2), 3.0))


def test_siglip_without_a_logit_bias_is_a_clear_error():
    images, texts = _features()
    with pytest.raises(ValueError, match="init_logit_bias"):
        _call("siglip", images, texts, torch.tensor(10.0), bias=None)


@pytest.mark.parametrize("name", CONTRASTIVE_LOSSES)
def test_non_positive_block_size_is_a_clear_error(name):
    with pytest.raises(ValueError, match="loss.block_size"):
        build_loss(LossConfig(name=name, block_size=0))


@pytest.mark.parametrize("name", list_losses())
def test_every_registered_loss_is_known_to_these_tests(name):
    """A new loss must join a parity list below (or get its own tests) before it can be registered."""
    assert name in CONTRASTIVE_LOSSES + CAPTIONING_LOSSES


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [1, 2, 3, 4])
def test_distributed_loss_and_gradients_equal_one_process_and_open_clip(nproc):
    """Loss and gradients of every contrastive loss, materialised and blockwise (block sizes 3 and 64 against
    local batches of 5), equal the one-process loss on the global batch and open_clip's distributed loss; so do
    those of the distillation terms (two teachers, every term; tests/dist_scripts/distillation_parity.py) against
    the one-process loss, in the same launch."""
    block_sizes = ["none", "3", "64"]
    result = torchrun(["tests/dist_scripts/loss_parity.py", "--losses", ",".join(CONTRASTIVE_LOSSES),
                       "--block-sizes", ",".join(block_sizes), "--local-batch", "5", "--distillation"], nproc=nproc)
    verdicts = [line for line in result.stdout.splitlines() if f"world={nproc}" in line]
    assert len(verdicts) == (len(CONTRASTIVE_LOSSES) + 1) * len(block_sizes), result.stdout
    assert sum(line.startswith("distillation ") for line in verdicts) == len(block_sizes), result.stdout
    assert all(line.endswith("OK") for line in verdicts), result.stdout


@pytest.mark.distributed
@pytest.mark.parametrize("loss_overrides", [
    ["loss=siglip", "loss.block_size=24", "model.init_logit_scale=2.302585", "model.init_logit_bias=-10"],
    ["loss=clip", "loss.block_size=24"],
], ids=["siglip", "clip"])
def test_two_process_training_with_a_blockwise_loss_lowers_the_loss(demo_root, tmp_path, loss_overrides):
    """Block size 24 does not divide the local batch of 32 (nor the gathered 64)."""
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(demo_root, run_dir) + loss_overrides + [
        "trainer.max_steps=30", "trainer.log_every=5", "trainer.checkpoint_every=30",
        "data.batch_size=64", "optim.lr=3e-3", "optim.warmup_steps=5", "data.num_workers=1",
    ]
    torchrun(["-m", "contrastive.cli.train", *overrides], nproc=2)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.3, losses
