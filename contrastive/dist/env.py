"""Process setup under torchrun (or a plain single process): backend, device, rank bookkeeping."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from contrastive.dist.collectives import Collectives, LocalCollectives, ProcessGroupCollectives

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    num_nodes: int
    device: torch.device
    backend: str | None  # None when running as one process without a process group
    collectives: Collectives

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def init_distributed(device: str = "auto", backend: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Join the torchrun process group if there is one; otherwise describe a single process.

    ``device="auto"`` picks CUDA when present, else CPU; ``backend="auto"`` pairs nccl with CUDA and gloo with CPU.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("dist.device=cuda but no CUDA device is visible; use dist.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    elif device == "cpu":
        torch_device = torch.device("cpu")
    else:
        raise ValueError(f"dist.device must be auto, cpu or cuda, got {device!r}")

    if backend == "auto":
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=torch_device if torch_device.type == "cuda" else None,
        )
    if world_size > 1:
        collectives: Collectives = ProcessGroupCollectives()
    else:
        collectives = LocalCollectives()
        backend = None
    num_nodes = max(1, world_size // max(1, local_world_size))
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        node_rank=rank // max(1, local_world_size),
        num_nodes=num_nodes,
        device=torch_device,
        backend=backend,
        collectives=collectives,
    )


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
