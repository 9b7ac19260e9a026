"""Model FLOPs per sample (counted once) and the throughput figures derived from them: FLOP/s and MFU.

Model FLOPs are those of one forward and backward of the model and loss (PaLM's MFU convention): work done again
by the feature cache's second forward or by activation checkpointing does not count, so MFU compares runs fairly.
The count runs torch's FlopCounterMode (matmuls, convolutions, attention) on a few samples of the first batch at each
input size (each stage; each NaFlex sequence length, which the trainer averages over its log window's steps);
the contrastive logits grow with the batch but are a negligible share at any realistic width.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from contrastive.dist.collectives import LocalCollectives
from contrastive.losses.registry import Objective
from contrastive.models.randomness import random_state, restore_random_state
from contrastive.train.step import batch_rows, forward
from contrastive.types import Batch


def flops_per_sample(model: nn.Module, objective: Objective, batch: Batch, samples: int = 4,
                     autocast: Callable[[], AbstractContextManager] = nullcontext) -> float:
    """Forward + backward FLOPs of `model` (unwrapped) and `objective` per sample; leaves RNG and gradients as found."""
    part = batch_rows(batch, slice(0, samples))
    saved_grads = {p: p.grad for p in model.parameters()}
    rng = random_state(model.randomness)
    with FlopCounterMode(display=False) as counter:
        with autocast():
            output = forward(model, part)
        result = objective(output.to_float32(), part, LocalCollectives(batch.images.device))
        result.loss.backward()
    restore_random_state(model.randomness, rng)
    for parameter, grad in saved_grads.items():
        parameter.grad = grad
    return counter.get_total_flops() / len(part)


def throughput_metrics(flops_per_sample: float, samples_per_second: float, world_size: int,
                       peak_flops_per_device: float | None) -> dict[str, float]:
    """Achieved model FLOP/s per device, and MFU when the device's peak is known."""
    achieved = flops_per_sample * samples_per_second / world_size
    metrics = {"flops_per_second_per_device": achieved}
    if peak_flops_per_device:
        metrics["mfu"] = achieved / peak_flops_per_device
    return metrics
