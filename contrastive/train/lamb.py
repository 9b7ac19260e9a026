"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"): Adam's update rescaled per parameter by the
trust ratio ||w|| / ||update||, as in NVIDIA's FusedLAMB and timm's Lamb.

The norms are of whole parameters: under FSDP a rank holds a dim-0 shard of each, and a shard's norm would give
every rank its own trust ratio, so the ranks' shards would no longer add up to the one-process step. The norms go
through contrastive.dist (an all-reduce per parameter under FSDP, none in one process); the update itself is
elementwise on the local shards. Gradient clipping is the trainer's (optim.grad_clip_norm), not this class's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from contrastive.dist.parallel import local, whole_norm


class Lamb(torch.optim.Optimizer):
    """LAMB with Adam's bias correction and L2 weight decay folded into the update before the trust ratio.

    always_adapt: apply the trust ratio to groups without weight decay too (norm gains, biases, the temperature);
    off by default, as in FusedLAMB and timm, so those train as plain Adam.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, always_adapt: bool = False) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "always_adapt": always_adapt})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            adapt = group["always_adapt"] or group["weight_decay"] != 0
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    # A 0-d tensor step, as torch's Adam keeps it, so full optimiser state dicts treat it alike.
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(parameter)
                    state["exp_avg_sq"] = torch.zeros_like(parameter)
                state["step"] += 1
                step = state["step"].item()  # on the host (CPU tensor): no device sync
                weight, grad = local(parameter), local(parameter.grad)
                exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denominator = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                update = (exp_avg / (1 - beta1 ** step)).div_(denominator)
                if group["weight_decay"] != 0:
                    update.add_(weight, alpha=group["weight_decay"])
                if adapt:
                    weight_norm = whole_norm(weight, like=parameter)
                    update_norm = whole_norm(update, like=parameter)
                    # A zero norm (a weight initialised to zero, a zero update) leaves the step at Adam's size.
                    trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
                    update.mul_(trust)
                weight.sub_(update, alpha=group["lr"])
        return loss
