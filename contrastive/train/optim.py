"""Optimiser parameter groups (weight decay or not, per-prefix lr multipliers; frozen parameters left out), the
optimiser step with gradient clipping and the non-finite guard, and the warmup + decay learning-rate schedule (a
multiplier of each group's own lr)."""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from contrastive.config import OptimConfig

NO_DECAY_NAME_PARTS = ("logit_scale", "logit_bias", "bias", "norm", "ln_", ".ln", "bn")


def uses_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """Matrices decay; vectors and scalars (norm gains, biases, temperature, bias) do not."""
    return parameter.ndim >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)


def _optimizer_class(path: str) -> type[torch.optim.Optimizer]:
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"optim.optimizer={path!r} cannot be imported: {error}") from error


def _lr_multiplier_of(name: str, multipliers: dict[str, float]) -> float:
    matches = [prefix for prefix in multipliers if name.startswith(prefix)]
    return multipliers[max(matches, key=len)] if matches else 1.0


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters grouped by (weight decay, lr multiplier); frozen ones are left out."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    used_prefixes: set[str] = set()
    for name, parameter in model.named_parameters():
        used_prefixes.update(prefix for prefix in cfg.lr_multipliers if name.startswith(prefix))
        if parameter.requires_grad:
            key = (uses_weight_decay(name, parameter), _lr_multiplier_of(name, cfg.lr_multipliers))
            groups.setdefault(key, []).append(parameter)
    unused = sorted(set(cfg.lr_multipliers) - used_prefixes)
    if unused:
        raise ValueError(f"optim.lr_multipliers prefix(es) {unused} match no parameter name (e.g. 'clip.visual.')")
    return [
        {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * multiplier}
        for (decay, multiplier), params in sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1]))
    ]


def _implementation_kwargs(optimizer_class: type[torch.optim.Optimizer], implementation: str) -> dict[str, bool]:
    if implementation == "auto":
        return {"fused": True} if "fused" in inspect.signature(optimizer_class).parameters else {}
    if implementation == "for_loop":
        return {"foreach": False}
    return {implementation: True}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    optimizer_class = _optimizer_class(cfg.optimizer)
    kwargs = {**_implementation_kwargs(optimizer_class, cfg.implementation), **cfg.extra_kwargs}
    try:
        return optimizer_class(parameter_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)
    except (TypeError, RuntimeError) as error:
        raise ValueError(f"optim.optimizer={cfg.optimizer} rejected its arguments {kwargs}: {error}") from error


def optimizer_step(parameters: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer,
                   max_grad_norm: float | None) -> tuple[torch.Tensor, bool]:
    """Clip the gradients to max_grad_norm, step only if all of them are finite, then clear them.

    Returns the total gradient norm before clipping and whether the step was taken. With gradients already reduced
    across ranks every rank sees the same norm, so all of them take the same branch.
    """
    with_grad = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
    full_norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    finite = bool(torch.isfinite(full_norm))
    if finite and max_grad_norm is not None and full_norm > max_grad_norm:  # scaling is a pass over every gradient
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_grad_norm, norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return full_norm, finite


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup from 0 to 1 over warmup_steps, then decay to min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, max_steps))
