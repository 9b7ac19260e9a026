"""Optimiser parameter groups (weight decay or not, per-prefix lr multipliers times per-tower layer-wise lr decay;
frozen parameters left out), the optimiser step with gradient clipping and the non-finite guard, and the warmup +
decay learning-rate schedule (a multiplier of each group's own lr)."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from contrastive.config import OptimConfig
from contrastive.dist.parallel import replicated
from contrastive.errors import ConfigError
from contrastive.models.locking import tower_layers

NO_DECAY_NAME_PARTS = ("logit_scale", "logit_bias", "bias", "norm", "ln_", ".ln", "bn")


def uses_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """Matrices decay; vectors and scalars (norm gains, biases, temperature, bias) do not."""
    return parameter.ndim >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)


def _optimizer_class(path: str) -> type[torch.optim.Optimizer]:
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"optim.optimizer={path!r} cannot be imported: {error}") from error


def _lr_multiplier_of(name: str, multipliers: dict[str, float]) -> float:
    matches = [prefix for prefix in multipliers if name.startswith(prefix)]
    return multipliers[max(matches, key=len)] if matches else 1.0


def _layer_decay_scales(model: nn.Module, cfg: OptimConfig) -> dict[str, float]:
    """Parameter name -> decay**(L + 1 - layer) for the towers with optim.layer_decay set (layers as in
    contrastive.models.locking.tower_layers: 0 the embeddings, i + 1 block i, L + 1 the head)."""
    scales = {}
    for tower in ("image", "text"):
        decay = getattr(cfg.layer_decay, tower)
        if decay is not None:
            depth, layers = tower_layers(model, tower)
            scales.update({name: decay ** (depth + 1 - layer) for name, layer in layers.items()})
    return scales


def _named_groups(model: nn.Module, cfg: OptimConfig) -> dict[tuple[bool, float], list[tuple[str, nn.Parameter]]]:
    """(weight decay, lr multiplier) -> the trainable (name, parameter) pairs with them, largest multiplier first
    among the decayed, then among the rest."""
    layer_scales = _layer_decay_scales(model, cfg)
    groups: dict[tuple[bool, float], list[tuple[str, nn.Parameter]]] = {}
    used_prefixes: set[str] = set()
    for name, parameter in model.named_parameters():
        used_prefixes.update(prefix for prefix in cfg.lr_multipliers if name.startswith(prefix))
        if parameter.requires_grad:
            multiplier = _lr_multiplier_of(name, cfg.lr_multipliers) * layer_scales.get(name, 1.0)
            groups.setdefault((uses_weight_decay(name, parameter), multiplier), []).append((name, parameter))
    unused = sorted(set(cfg.lr_multipliers) - used_prefixes)
    if unused:
        raise ConfigError(f"optim.lr_multipliers prefix(es) {unused} match no parameter name (e.g. 'clip.visual.')")
    return dict(sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1])))


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters grouped by (weight decay, lr multiplier); frozen ones are left out."""
    return [{"params": [parameter for _, parameter in named], "weight_decay": cfg.weight_decay if decay else 0.0,
             "lr": cfg.lr * multiplier} for (decay, multiplier), named in _named_groups(model, cfg).items()]


def describe(model: nn.Module, cfg: OptimConfig, max_steps: int) -> str:
    """The parameter groups and the schedule, to log once at start-up."""
    end = cfg.lr if cfg.schedule == "constant" else cfg.lr * cfg.min_lr_ratio
    lines = [f"{cfg.optimizer}: {cfg.warmup_steps} warmup steps to lr {cfg.lr:g}, then {cfg.schedule} to {end:g} "
             f"at step {max_steps}; parameter groups (lr x the schedule's lr):"]
    for (decay, multiplier), named in _named_groups(model, cfg).items():
        count = sum(parameter.numel() for _, parameter in named)
        names = ", ".join(name for name, _ in named[:3]) + (f", ... ({len(named)} tensors)" if len(named) > 3 else "")
        lines.append(f"  lr x{multiplier:.4g}, weight decay {cfg.weight_decay if decay else 0.0:g}, "
                     f"{count:,} parameters: {names}")
    return "\n".join(lines)


def _implementation_kwargs(optimizer_class: type[torch.optim.Optimizer], implementation: str) -> dict[str, bool]:
    if implementation == "auto":
        return {"fused": True} if "fused" in inspect.signature(optimizer_class).parameters else {}
    if implementation == "for_loop":
        return {"foreach": False}
    return {implementation: True}


def _adam_kwargs(optimizer_class: type[torch.optim.Optimizer], cfg: OptimConfig) -> dict[str, Any]:
    """optim.betas and optim.eps for the optimisers that take them. Another optimiser (SGD) builds without them
    while they keep the schema's defaults; set to anything else, they would do nothing, which is refused."""
    accepted = inspect.signature(optimizer_class).parameters
    schema = OptimConfig()
    kwargs = {}
    for name, value, default in (("betas", tuple(cfg.betas), tuple(schema.betas)), ("eps", cfg.eps, schema.eps)):
        if name in accepted:
            kwargs[name] = value
        elif value != default:
            raise ConfigError(f"optim.{name}={list(value) if name == 'betas' else value} does nothing: "
                             f"{cfg.optimizer} takes no {name}; remove the override")
    return kwargs


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    optimizer_class = _optimizer_class(cfg.optimizer)
    kwargs = {**_adam_kwargs(optimizer_class, cfg), **_implementation_kwargs(optimizer_class, cfg.implementation),
              **cfg.extra_kwargs}
    try:
        return optimizer_class(parameter_groups(model, cfg), lr=cfg.lr, **kwargs)
    except (TypeError, RuntimeError) as error:
        raise ConfigError(f"optim.optimizer={cfg.optimizer} rejected its arguments {kwargs}: {error}") from error


def skips_without_host_sync(optimizer: torch.optim.Optimizer) -> bool:
    """Fused optimisers read a clip divisor and a skip flag as device tensors (what torch's GradScaler hands them)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups)


def optimizer_step(parameters: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer,
                   max_grad_norm: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradients to max_grad_norm, step only if all of them are finite, then clear them.

    Returns the total gradient norm before clipping and whether the step was taken, both as 0-d device tensors:
    with a fused optimiser (`optim.implementation=auto` picks one for AdamW, Adam and SGD) nothing here waits for
    the device. The kernel divides every gradient by max(1, norm / max_grad_norm) as it reads it, so clipping
    costs no extra pass, and a non-finite norm raises its skip flag, which leaves weights, moments and step
    counts as they were. Other optimisers get the same results with one host sync per step. With gradients
    already reduced across ranks every rank sees the same norm, so all of them take the same branch.
    """
    with_grad = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
    full_norm = replicated(norm)
    finite = torch.isfinite(full_norm)
    if skips_without_host_sync(optimizer):
        optimizer.found_inf = (~finite).float()
        if max_grad_norm is not None:
            optimizer.grad_scale = (full_norm.float() / max_grad_norm).clamp(min=1.0)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
            if max_grad_norm is not None:
                del optimizer.grad_scale
    elif bool(finite):
        if max_grad_norm is not None and full_norm > max_grad_norm:  # scaling is a pass over every gradient
            torch.nn.utils.clip_grads_with_norm_(with_grad, max_grad_norm, norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return full_norm, finite


@dataclass(frozen=True)
class NonfiniteReport:
    skipped: int  # steps skipped since the previous read
    longest_run: int  # the longest run of consecutive skipped steps seen since the previous read
    ongoing_run: int  # skipped steps in a row up to now


class NonfiniteSteps:
    """Steps skipped for a non-finite loss or gradients, counted on the device so that no step waits to know."""

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.total_on_device, self.ongoing_run, self.longest_run = zero.clone(), zero.clone(), zero.clone()
        self.total = 0  # as of the last read

    def record(self, stepped: torch.Tensor) -> None:
        skipped = (~stepped).long()
        self.total_on_device += skipped
        self.ongoing_run = (self.ongoing_run + 1) * skipped
        self.longest_run = torch.maximum(self.longest_run, self.ongoing_run)

    def counters(self) -> torch.Tensor:
        """(3,) float: total, ongoing run, longest run; for the caller to bring to the host with its other values."""
        return torch.stack([self.total_on_device, self.ongoing_run, self.longest_run]).float()

    def read(self, counters: list[float]) -> NonfiniteReport:
        """Take the host values of `counters()`; the next longest run starts from the ongoing one."""
        total, ongoing, longest = (int(value) for value in counters)
        report = NonfiniteReport(skipped=total - self.total, longest_run=longest, ongoing_run=ongoing)
        self.total = total
        self.longest_run = self.ongoing_run.clone()
        return report

    def read_total(self) -> int:
        return int(self.total_on_device)


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup from 0 to 1 over warmup_steps, then decay to min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, max_steps))
