"""Everything that knows about more than one process: torchrun environment, collectives, model wrapping."""

from contrastive.dist.collectives import LocalCollectives, ProcessGroupCollectives
from contrastive.dist.env import DistEnv, init_distributed, shutdown_distributed

__all__ = [
    "DistEnv",
    "LocalCollectives",
    "ProcessGroupCollectives",
    "init_distributed",
    "shutdown_distributed",
]
