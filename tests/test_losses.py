"""Every registered loss against a direct formula and open_clip's implementation, in one process and across
torchrun ranks (gloo), for the loss value and its gradients."""

from __future__ import annotations

import math

import open_clip.loss
import pytest
import torch
import torch.nn.functional as F

from contrastive.config import LossConfig
from contrastive.dist import LocalCollectives
from contrastive.losses import build_loss, list_losses
from contrastive.types import Batch, ModelOutput
from tests.conftest import torchrun

CONTRASTIVE_LOSSES = ["clip"]


def _features(batch: int = 6, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(batch, dim, generator=generator), dim=-1),
            F.normalize(torch.randn(batch, dim, generator=generator), dim=-1))


def _call(name: str, images, texts, scale, bias=None):
    output = ModelOutput(image_features=images, text_features=texts, logit_scale=scale, logit_bias=bias)
    batch = Batch(images=torch.empty(len(images), 0), tokens=torch.empty(len(images), 0, dtype=torch.long))
    return build_loss(LossConfig(name=name))(output, batch, LocalCollectives())


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


def test_clip_loss_matches_open_clip_with_gradients():
    images, texts = _features(batch=9, dim=16, seed=3)
    ours = [t.clone().requires_grad_(True) for t in (images, texts, torch.tensor(math.exp(2.0)))]
    theirs = [t.clone().requires_grad_(True) for t in (images, texts, torch.tensor(math.exp(2.0)))]
    _call("clip", *ours).loss.backward()
    open_clip.loss.ClipLoss()(*theirs).backward()
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list_losses())
def test_every_registered_loss_is_known_to_these_tests(name):
    """A new loss must join a parity list below (or get its own tests) before it can be registered."""
    assert name in CONTRASTIVE_LOSSES


@pytest.mark.distributed
@pytest.mark.parametrize("loss_name", CONTRASTIVE_LOSSES)
@pytest.mark.parametrize("nproc", [2, 4])
def test_distributed_loss_and_gradients_equal_one_process(loss_name, nproc):
    result = torchrun(["tests/dist_scripts/loss_parity.py", "--loss", loss_name, "--local-batch", "5"], nproc=nproc)
    assert "OK" in result.stdout, result.stdout
