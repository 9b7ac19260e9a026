"""The loss registry and the interface every objective implements."""

from __future__ import annotations

from typing import Protocol

from contrastive.config import LossConfig
from contrastive.losses.self_distillation import WithSelfDistillation
from contrastive.registry import Registry
from contrastive.types import Batch, Collectives, LossOutput, ModelOutput

# How an objective's loss over a local batch splits into K micro-batches (trainer.accumulation_steps=K); each
# objective declares one, and the training step builds its forward-backward from it.
FEATURE_CACHE = "feature_cache"  # a function of the features, temperature and bias only: cache them, score once
PER_EXAMPLE_MEAN = "per_example_mean"  # a mean of per-example terms: the mean of K micro-batch losses is exact
WHOLE_BATCH = "whole_batch"  # neither: only K=1 is exact
ACCUMULATION_MODES = (FEATURE_CACHE, PER_EXAMPLE_MEAN, WHOLE_BATCH)


class Objective(Protocol):
    accumulation: str  # one of ACCUMULATION_MODES

    def __call__(self, output: ModelOutput, batch: Batch, collectives: Collectives) -> LossOutput: ...


LOSSES: Registry = Registry("loss")


def list_losses() -> list[str]:
    return LOSSES.names()


def build_loss(cfg: LossConfig) -> Objective:
    from contrastive.losses.distillation import WithDistillation  # it needs this module's accumulation modes

    objective = LOSSES.get(cfg.name)(cfg)
    if cfg.self_distillation.enabled:
        objective = WithSelfDistillation(objective, cfg.self_distillation)
    if cfg.distillation.teachers:
        objective = WithDistillation(objective, cfg.distillation, cfg.block_size)
    return objective


def losses_accumulating_by(mode: str) -> list[str]:
    """The registered losses that declare `mode`."""
    return [name for name in list_losses() if LOSSES.get(name).accumulation == mode]
