"""Optimiser parameter groups (weight decay or not, per-prefix lr multipliers; frozen parameters left out) and the
warmup + decay learning-rate schedule (a multiplier of each group's own lr)."""

from __future__ import annotations

import importlib
import math

import torch
from torch import nn

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


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    optimizer_class = _optimizer_class(cfg.optimizer)
    try:
        return optimizer_class(parameter_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                               **cfg.extra_kwargs)
    except TypeError as error:
        raise ValueError(f"optim.optimizer={cfg.optimizer} rejected its arguments: {error}") from error


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
