"""The loss registry and the interface every objective implements."""

from __future__ import annotations

from typing import Protocol

import torch

from contrastive.config import LossConfig
from contrastive.losses.self_distillation import WithSelfDistillation
from contrastive.registry import Registry
from contrastive.types import Batch, Collectives, LossOutput, ModelOutput

# How an objective's loss over a local batch splits into K micro-batches (trainer.accumulation_steps=K); each
# objective declares one, and the training step builds its forward-backward from it.
FEATURE_CACHE = "feature_cache"  # a function of the features, temperature and bias only: cache them, score once
PER_EXAMPLE_MEAN = "per_example_mean"  # a mean of per-example terms: the mean of K micro-batch losses is exact
WHOLE_BATCH = "whole_batch"  # neither: only K=1 is exact
# Both at once: terms of the features, cached and scored once, plus a weighted mean of per-example terms that each
# micro-batch computes from its own forward (LocCa's decoder term: no cache holds caption logits). Such an objective
# also implements PerExampleSplit.
FEATURE_CACHE_AND_PER_EXAMPLE_MEAN = "feature_cache_and_per_example_mean"
ACCUMULATION_MODES = (FEATURE_CACHE, PER_EXAMPLE_MEAN, WHOLE_BATCH, FEATURE_CACHE_AND_PER_EXAMPLE_MEAN)


class Objective(Protocol):
    accumulation: str  # one of ACCUMULATION_MODES

    def __call__(self, output: ModelOutput, batch: Batch, collectives: Collectives) -> LossOutput: ...


class PerExampleSplit(Protocol):
    """An objective's loss as feature terms + per_example_weight * the batch mean of per-example terms, in parts the
    feature cache runs separately (contrastive.train.step.FeatureCache); __call__ must equal their combination."""

    per_example_weight: float

    def feature_terms(self, output: ModelOutput, batch: Batch, collectives: Collectives) -> LossOutput: ...

    def per_example_terms(self, output: ModelOutput, batch: Batch) -> torch.Tensor: ...  # (B,), unweighted

    def combine(self, features: LossOutput, per_example: torch.Tensor, batch: Batch) -> LossOutput: ...


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
