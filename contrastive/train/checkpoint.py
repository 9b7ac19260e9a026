"""Checkpoints: written atomically by rank 0, read safely (weights_only), found by step for resume=latest."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)
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
    found = [(int(m.group(1)), directory / m.group(0)) for m in map(CHECKPOINT_PATTERN.match, os.listdir(directory)) if m]
    return sorted(found)


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def save_checkpoint(state: dict[str, Any], path: Path, keep_last: int, keep_every: int | None = None) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: a crash leaves the old files intact.

    Afterwards only the newest `keep_last` checkpoints remain, plus those whose step is a multiple of `keep_every`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    for step, old in list_checkpoints(path.parent.parent)[:-keep_last]:
        if not (keep_every and step % keep_every == 0):
            old.unlink(missing_ok=True)


def remove_partial_writes(run_dir: str | Path) -> list[Path]:
    """Delete temporary files left by a write that was killed halfway (they never carry a checkpoint's name)."""
    directory = checkpoint_dir(run_dir)
    partial = sorted(directory.glob(".step_*.tmp")) if directory.is_dir() else []
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without executing pickled code; failures name the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for truncated or foreign files
        raise ValueError(f"checkpoint {path} cannot be read (truncated, corrupt or not a contrastive checkpoint): "
                         f"{str(error).splitlines()[0]}") from error
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a contrastive checkpoint (no model state or config)")
    return state


def load_resume_state(resume: str | None, run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its state: a named file, or for 'latest' the newest one that loads."""
    if resume is None:
        return None
    if resume != "latest":
        return Path(resume), load_checkpoint(resume)
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except ValueError as error:
            log.warning("skipping unreadable checkpoint %s: %s", path, error)
    return None


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
        raise ValueError(
            f"checkpoint {path} does not match this model architecture: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} mismatched tensors "
            f"(e.g. {(missing + unexpected + mismatched)[:3]})"
        )
