"""An exponential moving average (EMA) of a model's trainable weights, laid out as the model is (sharded under
FSDP2, whole otherwise). The trainer keeps one for evaluation and export (`--weights ema`); a self-distillation
teacher (SigLIP 2) reads its weights the same way.

Each update moves the average towards the weights by 1 - d. With warm-up, d = min(decay, (1 + n) / (10 + n))
after n updates, as tf.train.ExponentialMovingAverage's num_updates: early on, when the weights move fast and the
average still holds the random initialisation, it follows them closely.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.tensor import DTensor


def plain_name(name: str) -> str:
    """A parameter's name as state dicts give it: without activation checkpointing's wrapper prefix."""
    return name.replace(_CHECKPOINT_PREFIX, "")


@torch.no_grad()
def lerp_towards(averages: list[torch.Tensor], targets: list[torch.Tensor], weight: float) -> None:
    """averages[i] += weight * (targets[i] - averages[i]), each laid out as its target (sharded or whole)."""
    # foreach kernels take lists of one kind: FSDP's sharded parameters, and the whole ones it leaves alone
    # (0-d logit scale and bias)
    for sharded in (True, False):
        pairs = [(a, t) for a, t in zip(averages, targets, strict=True) if isinstance(t, DTensor) == sharded]
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [t for _, t in pairs], weight)


class ExponentialMovingAverage:
    """`shadow`: name -> averaged tensor, for every trainable parameter of `model` (built after the model is
    wrapped for data parallelism, so each average is laid out, and sharded, as its parameter)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.parameters = {plain_name(name): parameter for name, parameter in model.named_parameters()
                           if parameter.requires_grad}
        self.shadow = {name: parameter.detach().clone() for name, parameter in self.parameters.items()}

    def decay_at(self, updates: int) -> float:
        """The decay of the `updates`-th update (counting from 1)."""
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, updates: int) -> None:
        """Move the average towards the current weights; `updates` counts this update (the optimiser step just
        taken), so a resumed run continues the warm-up where it stopped."""
        names = list(self.parameters)
        lerp_towards([self.shadow[n] for n in names], [self.parameters[n].detach() for n in names],
                     1.0 - self.decay_at(updates))

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average from the current weights (a run that resumes a checkpoint without EMA weights)."""
        for name, parameter in self.parameters.items():
            self.shadow[name].copy_(parameter.detach())
