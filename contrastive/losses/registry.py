"""The loss registry and the interface every objective implements."""

from __future__ import annotations

from typing import Protocol

from contrastive.config import LossConfig
from contrastive.registry import Registry
from contrastive.types import Batch, Collectives, LossOutput, ModelOutput


class Objective(Protocol):
    def __call__(self, output: ModelOutput, batch: Batch, collectives: Collectives) -> LossOutput: ...


LOSSES: Registry = Registry("loss")


def list_losses() -> list[str]:
    return LOSSES.names()


def build_loss(cfg: LossConfig) -> Objective:
    return LOSSES.get(cfg.name)(cfg)
