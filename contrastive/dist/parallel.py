"""Wrapping a model for data parallelism, and reaching the plain module underneath."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from contrastive.dist.env import DistEnv


def wrap_data_parallel(model: nn.Module, env: DistEnv) -> nn.Module:
    if env.world_size == 1:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
