"""All cross-rank communication. Losses and the trainer talk to other ranks only through a `Collectives` object
(the protocol is in contrastive.types, so losses need nothing from here).

`LocalCollectives` is the one-process case (every operation is the identity), `ProcessGroupCollectives` runs
on the default torch.distributed process group. Both present the same interface, so losses stay pure maths.

Every tensor handed to a collective lives on the group's `device`: nccl takes only CUDA tensors, so a CPU tensor
that works under gloo stops a GPU run at its first step. Callers create their tensors there; the reductions
refuse any other device with a message naming it, on every backend, so CPU tests catch what nccl would.
Object collectives pickle through whatever device the group picks for them (CPU under `cpu:gloo,cuda:nccl`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class LocalCollectives:
    rank = 0
    world_size = 1

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def ring_exchange_with_grad(
        self, to_next: torch.Tensor, to_previous: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # A ring of one: my next and my previous are both me.
        return to_next, to_previous

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


# torch 2.14 renamed the tensor collectives and warns on the old names, which older releases still need.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: every rank's gradient for my slice, summed.

    Each rank's loss uses the gathered tensor, so the gradient of the summed loss with respect to my
    slice is the sum over ranks of their gradients for it (DDP then divides by world size).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_single(gathered, tensor.contiguous())
        return gathered

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        grad_output = grad_output.contiguous()
        # By the tensor's device, not the backend's name: a `cpu:gloo,cuda:nccl` group names both.
        if grad_output.device.type != "cpu":
            local = grad_output.new_empty((grad_output.shape[0] // world_size, *grad_output.shape[1:]))
            _reduce_scatter_single(local, grad_output)
            return local
        dist.all_reduce(grad_output)  # gloo before torch 2.12 has no reduce-scatter
        return grad_output.chunk(world_size)[rank].clone()


def _neighbours() -> tuple[int, int]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return (rank + 1) % world_size, (rank - 1) % world_size


def _point_to_point(sends: list[tuple[torch.Tensor, int, int]], receives: list[tuple[torch.Tensor, int, int]]):
    """Post every (tensor, peer, tag) send and receive at once and wait for all; fills the receive buffers.

    Tags tell the two directions apart when next and previous are the same rank (a ring of two).
    """
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), peer, tag=tag) for tensor, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, buffer, peer, tag=tag) for buffer, peer, tag in receives]
    for request in dist.batch_isend_irecv(ops):
        request.wait()


class _RingExchangeWithGrad(torch.autograd.Function):
    """Forward: pass tensors one step around the ring. Backward: pass their gradients one step the other way.

    What I received from rank - 1 is rank - 1's `to_next`, so its gradient goes back to rank - 1; what I received
    from rank + 1 is its `to_previous`, so its gradient goes back to rank + 1.
    """

    @staticmethod
    def forward(ctx, to_next: torch.Tensor, to_previous: torch.Tensor | None):
        next_rank, previous_rank = _neighbours()
        ctx.templates = [torch.empty_like(to_next, device="meta")]
        from_previous, from_next = torch.empty_like(to_next), None
        sends, receives = [(to_next, next_rank, 0)], [(from_previous, previous_rank, 0)]
        if to_previous is not None:
            ctx.templates.append(torch.empty_like(to_previous, device="meta"))
            from_next = torch.empty_like(to_previous)
            sends.append((to_previous, previous_rank, 1))
            receives.append((from_next, next_rank, 1))
        _point_to_point(sends, receives)
        ctx.device = to_next.device
        return from_previous, from_next

    @staticmethod
    def backward(ctx, grad_from_previous: torch.Tensor | None, grad_from_next: torch.Tensor | None):
        next_rank, previous_rank = _neighbours()
        # A received tensor that no loss used has no gradient, but its sender still waits for one.
        grads = [grad if grad is not None else torch.zeros_like(template, device=ctx.device)
                 for grad, template in zip((grad_from_previous, grad_from_next), ctx.templates)]
        grad_to_next = torch.empty_like(grads[0])
        sends, receives = [(grads[0], previous_rank, 2)], [(grad_to_next, next_rank, 2)]
        grad_to_previous = None
        if len(grads) == 2:
            grad_to_previous = torch.empty_like(grads[1])
            sends.append((grads[1], next_rank, 3))
            receives.append((grad_to_previous, previous_rank, 3))
        _point_to_point(sends, receives)
        return grad_to_next, grad_to_previous


class ProcessGroupCollectives:
    def __init__(self, device: torch.device | str) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupCollectives needs an initialised default process group")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device(device)

    def _require_group_device(self, tensor: torch.Tensor, operation: str) -> None:
        if tensor.device.type != self.device.type:
            raise RuntimeError(f"{operation} got a tensor on {tensor.device}; this process group's collectives take "
                               f"tensors on {self.device}")

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        self._require_group_device(tensor, "all_gather_with_grad")
        return _AllGatherWithGrad.apply(tensor)

    def ring_exchange_with_grad(
        self, to_next: torch.Tensor, to_previous: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._require_group_device(to_next, "ring_exchange_with_grad")
        return _RingExchangeWithGrad.apply(to_next, to_previous)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        self._require_group_device(tensor, "all_reduce_mean")
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced)
        return reduced / self.world_size

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self._require_group_device(tensor, "all_reduce_sum")
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
