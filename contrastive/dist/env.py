"""Process setup under torchrun (or a plain single process): backend, device, rank bookkeeping."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from contrastive.dist.collectives import LocalCollectives, ProcessGroupCollectives
from contrastive.types import Collectives
from contrastive.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device
    collectives: Collectives

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _rendezvous_store(timeout: datetime.timedelta) -> dist.Store:
    """The env:// store, scoped to this worker group when torchrun's agent hosts it.

    The agent's store outlives its workers, and torch keys the process group's addresses the same way in every
    restart, so a restarted group can read the dead group's addresses from it and fail to connect ("Connection
    refused"). Keys under the restart count, which every agent of a static rendezvous advances together, are never
    stale. Dynamic (c10d) rendezvous can restart one node's workers without counting, so launch/ turns the shared
    store off there (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): each rendezvous round then gets a fresh store.
    """
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store
    restarts = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    if _env_int("TORCHELASTIC_MAX_RESTARTS", 0) > 0 and _env_int("GROUP_WORLD_SIZE", 1) > 1:
        log.warning("multi-node restarts with torchrun's shared rendezvous store: under --rdzv-backend=c10d set "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/slurm_node.sh does) so nodes agree on the store")
    return dist.PrefixStore(f"contrastive/restart_{restarts}/", store)


def init_distributed(device: str = "auto", backend: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Join the torchrun process group if there is one; otherwise describe a single process.

    ``device="auto"`` picks CUDA when present, else CPU. ``backend="auto"`` is gloo on CPU and, on CUDA, nccl for
    CUDA tensors with gloo beside it for CPU tensors (``cpu:gloo,cuda:nccl``): object collectives (data positions,
    RNG states, evaluation results) then pickle through host memory instead of round trips to the GPU.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("dist.device=cuda but no CUDA device is visible; use dist.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    elif device == "cpu":
        torch_device = torch.device("cpu")
    else:
        raise ConfigError(f"dist.device must be auto, cpu or cuda, got {device!r}")

    if backend == "auto":
        backend = "cpu:gloo,cuda:nccl" if torch_device.type == "cuda" else "gloo"
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(
            backend=backend,
            store=_rendezvous_store(timeout),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=torch_device if torch_device.type == "cuda" else None,
        )
    collectives = ProcessGroupCollectives(torch_device) if world_size > 1 else LocalCollectives(torch_device)
    return DistEnv(rank=rank, world_size=world_size, device=torch_device, collectives=collectives)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
