"""LAMB: one step against the update written out by hand (moments, bias correction, trust ratio, zero norms), and
under FSDP on two ranks against the one-process step (whole-parameter norms, not shard norms)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from contrastive.config import OptimConfig
from contrastive.train.lamb import Lamb
from contrastive.train.optim import build_optimizer
from tests.conftest import compose_config, torchrun

BETA1, BETA2, EPS, LR, DECAY = 0.9, 0.99, 1e-6, 0.1, 0.01


def hand_lamb(weight: list[float], grads: list[list[float]], weight_decay: float, adapt: bool) -> list[float]:
    """LAMB steps on a flat list of floats, one Python float at a time."""
    m, v = [0.0] * len(weight), [0.0] * len(weight)
    for t, grad in enumerate(grads, start=1):
        m = [BETA1 * a + (1 - BETA1) * g for a, g in zip(m, grad, strict=True)]
        v = [BETA2 * a + (1 - BETA2) * g * g for a, g in zip(v, grad, strict=True)]
        update = [(a / (1 - BETA1 ** t)) / (math.sqrt(b / (1 - BETA2 ** t)) + EPS) + weight_decay * w
                  for a, b, w in zip(m, v, weight, strict=True)]
        w_norm, u_norm = math.sqrt(sum(w * w for w in weight)), math.sqrt(sum(u * u for u in update))
        trust = w_norm / u_norm if adapt and w_norm > 0 and u_norm > 0 else 1.0
        weight = [w - LR * trust * u for w, u in zip(weight, update, strict=True)]
    return weight


@pytest.mark.parametrize(("start", "weight_decay", "always_adapt"), [
    ([3.0, -4.0, 0.5, 1.0], DECAY, False),  # trust ratio ||w|| / ||update|| != 1
    ([3.0, -4.0, 0.5, 1.0], 0.0, False),  # no decay: plain Adam
    ([3.0, -4.0, 0.5, 1.0], 0.0, True),  # no decay, adapted anyway
    ([0.0, 0.0, 0.0, 0.0], DECAY, False),  # ||w|| = 0: ratio 1
])
def test_steps_match_the_hand_computation(start, weight_decay, always_adapt):
    grads = [[0.1, -0.2, 0.3, 0.0], [0.5, 0.1, -0.1, 0.2]]
    parameter = nn.Parameter(torch.tensor(start, dtype=torch.float64).view(2, 2))
    optimizer = Lamb([parameter], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=weight_decay,
                     always_adapt=always_adapt)
    for grad in grads:
        parameter.grad = torch.tensor(grad, dtype=torch.float64).view(2, 2)
        optimizer.step()
    expected = hand_lamb(start, grads, weight_decay, adapt=always_adapt or weight_decay != 0)
    torch.testing.assert_close(parameter.detach().flatten(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_zero_update_keeps_the_weight():
    """||update|| = 0 (zero gradient, no decay, adapted): ratio 1, not a division by zero."""
    parameter = nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = Lamb([parameter], always_adapt=True)
    parameter.grad = torch.zeros(2)
    optimizer.step()
    torch.testing.assert_close(parameter.detach(), torch.tensor([1.0, 2.0]), rtol=0, atol=0)


def test_optim_lamb_config_builds_lamb_with_its_settings():
    cfg = OmegaConf.to_object(compose_config(["optim=lamb"]).optim)
    optimizer = build_optimizer(nn.Linear(4, 4), cfg)
    assert isinstance(optimizer, Lamb) and optimizer.defaults["lr"] == pytest.approx(2e-3)
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    optimizer = build_optimizer(nn.Linear(4, 4), OptimConfig(optimizer="contrastive.train.lamb.Lamb",
                                                             extra_kwargs={"always_adapt": True}))
    assert optimizer.defaults["always_adapt"] is True


@pytest.mark.distributed
def test_two_rank_fsdp_step_equals_the_one_process_step():
    script = Path(__file__).parent / "dist_scripts" / "lamb_fsdp.py"
    result = torchrun([str(script)], nproc=2, timeout=300)
    assert "lamb fsdp parity ok" in result.stdout, result.stdout + result.stderr
