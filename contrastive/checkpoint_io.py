"""Checkpoint files: where a run keeps them, finding them by step, and reading them safely (weights_only).

A leaf: models (pretrained weights, locked towers), training, evaluation and export all read checkpoints through
it. Writing them is training's business (contrastive.train.checkpoint).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contrastive.errors import InputError

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first. Partial writes never carry the final name."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), directory / m.group(0))
             for m in map(CHECKPOINT_PATTERN.match, os.listdir(directory)) if m]
    return sorted(found)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its newest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise InputError(f"run directory {path} holds no checkpoints (looked in {path / 'checkpoints'})")
        return found[-1][1]
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without executing pickled code; failures name the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise InputError(f"checkpoint {path} cannot be read (truncated, corrupt or not a contrastive checkpoint): "
                         f"{str(error).splitlines()[0]}") from error
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise InputError(f"{path} is not a contrastive checkpoint (no model state or config)")
    return state


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    apply_model_state(model, load_checkpoint(path)["model"], path)


def apply_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load weights; a checkpoint of a different architecture is named as such, not a torch stack trace."""
    check_model_state(model, state, path)
    model.load_state_dict(state)


def check_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise ValueError naming the differences when `state` does not fit `model` (sharded or not) name for name."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise InputError(
            f"checkpoint {path} does not match this model architecture: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} mismatched tensors "
            f"(e.g. {(missing + unexpected + mismatched)[:3]})"
        )
