"""Checkpoints as training writes them: atomically by rank 0 with rotation, partial writes cleared, the resume
state chosen. Their layout and reading are in contrastive.checkpoint_io."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from contrastive.checkpoint_io import checkpoint_dir, list_checkpoints, load_checkpoint

log = logging.getLogger(__name__)


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


def load_resume_state(resume: str | None, run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its state: a named file, or for 'latest' the newest one that loads."""
    if resume is None:
        return None
    if resume != "latest":
        return Path(resume), load_checkpoint(resume)
    for _step, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except ValueError as error:
            log.warning("skipping unreadable checkpoint %s: %s", path, error)
    return None
