"""All cross-rank communication. Losses and the trainer talk to other ranks only through a `Collectives` object.

`LocalCollectives` is the one-process case (every operation is the identity), `ProcessGroupCollectives` runs
on the default torch.distributed process group. Both present the same interface, so losses stay pure maths.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist


class Collectives(Protocol):
    rank: int
    world_size: int

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's (B, ...) tensor along dim 0 into (world_size * B, ...), differentiably."""

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over ranks, without gradient (for metrics)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, without gradient (for counters)."""

    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def barrier(self) -> None: ...


class LocalCollectives:
    rank = 0
    world_size = 1

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: every rank's gradient for my slice, summed.

    Each rank's loss uses the gathered tensor, so the gradient of the summed loss with respect to my
    slice is the sum over ranks of their gradients for it (DDP then divides by world size).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(gathered, tensor.contiguous())
        return gathered

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        grad_output = grad_output.contiguous()
        if dist.get_backend() == "nccl":
            local = grad_output.new_empty((grad_output.shape[0] // world_size, *grad_output.shape[1:]))
            dist.reduce_scatter_tensor(local, grad_output)
            return local
        dist.all_reduce(grad_output)  # gloo has no reduce-scatter
        return grad_output.chunk(world_size)[rank].clone()


class ProcessGroupCollectives:
    def __init__(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupCollectives needs an initialised default process group")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        return _AllGatherWithGrad.apply(tensor)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced)
        return reduced / self.world_size

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced)
        return reduced

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        dist.barrier()
