"""Checkpoints as training writes them, in either format (see contrastive.checkpoint_io for the layouts): writes
that are atomic, rotation (keep-last-K and every M-th), partial writes cleared, the resume state chosen and read
back, and conversion between the formats.

Single file: rank 0 gathers the whole state and writes it with torch.save, while every rank waits. Sharded (DCP):
every rank snapshots its own shards and writes them in the background while training goes on; rank 0 writes the
commit marker once DCP's metadata is written, and only then does the checkpoint count (for resume and rotation).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from contrastive.checkpoint_io import (
    COMMIT_MARKER,
    SHARDED_PARTS,
    TRAINER_STATE_FILE,
    check_model_state,
    checkpoint_dir,
    checkpoint_path,
    is_committed,
    list_checkpoints,
    load_checkpoint,
    load_trainer_state,
    sharded_metadata,
)
from contrastive.dist import DistEnv
from contrastive.dist.checkpointing import (
    checkpoint_process_group,
    gather_whole,
    load_sharded,
    load_whole,
    sharded_state,
    snapshot_stager,
    start_save,
)
from contrastive.dist.parallel import full_state, load_full_state
from contrastive.errors import InputError
from contrastive.models.ema import ExponentialMovingAverage

log = logging.getLogger(__name__)


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def resolve_format(checkpoint_format: str, strategy: str) -> str:
    """`auto`: sharded under FSDP (whose state no rank should have to hold whole), a single file under DDP."""
    if checkpoint_format != "auto":
        return checkpoint_format
    return "dcp" if strategy == "fsdp" else "single"


def _write_atomically(state: Any, path: Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, rename: a crash leaves no half-written file
    under the final name."""
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
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def _commit(directory: Path) -> None:
    """Mark a sharded checkpoint complete: its DCP metadata and trainer state are on disk."""
    marker = directory / COMMIT_MARKER
    with open(marker, "w") as handle:
        handle.write("complete\n")
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_directory(directory)


def rotate(run_dir: Path, keep_last: int, keep_every: int | None) -> None:
    """Keep the newest `keep_last` complete checkpoints, plus those whose step is a multiple of `keep_every`."""
    for step, old in list_checkpoints(run_dir)[:-keep_last]:
        if not (keep_every and step % keep_every == 0):
            _remove(old)


def save_checkpoint(state: dict[str, Any], path: Path, keep_last: int, keep_every: int | None = None) -> None:
    """Write a single-file checkpoint atomically, then rotate."""
    _write_atomically(state, path)
    rotate(path.parent.parent, keep_last, keep_every)


def remove_partial_writes(run_dir: str | Path) -> list[Path]:
    """Delete what killed writes left: temporary files (they never carry a checkpoint's name) and sharded
    directories without a commit marker."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    partial = sorted(directory.glob(".step_*.tmp"))
    partial += sorted(path for path in directory.glob("step_*") if path.is_dir() and not is_committed(path))
    for path in partial:
        _remove(path)
    return partial


def _remove(path: Path) -> None:
    if path.is_dir():
        (path / COMMIT_MARKER).unlink(missing_ok=True)  # first: a deletion cut short leaves no complete-looking rest
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def load_resume_state(resume: str | None, run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its state: a named one, or for 'latest' the newest one that loads. Of a
    sharded checkpoint only the trainer state is read here; its tensors are read sharded (`restore`)."""
    if resume is None:
        return None
    if resume != "latest":
        return Path(resume), _read_for_resume(Path(resume))
    for _step, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, _read_for_resume(path)
        except ValueError as error:
            log.warning("skipping unreadable checkpoint %s: %s", path, error)
    return None


def _read_for_resume(path: Path) -> dict[str, Any]:
    if path.is_dir():
        state = load_trainer_state(path)
        sharded_metadata(path)  # a checkpoint whose DCP metadata is gone is skipped like a damaged file
        return state
    return load_checkpoint(path)


class Checkpointer:
    """Writes the trainer's checkpoints in `checkpoint_format` ("single" or "dcp") and reads either back. Every
    rank calls `save`, `restore` and `wait` at the same points."""

    def __init__(self, run_dir: Path, checkpoint_format: str, env: DistEnv, keep_last: int,
                 keep_every: int | None) -> None:
        self.run_dir, self.format, self.env = run_dir, checkpoint_format, env
        self.keep_last, self.keep_every = keep_last, keep_every
        self.group = checkpoint_process_group()  # also reads sharded checkpoints in single-file runs
        self.stager = snapshot_stager(env.device) if checkpoint_format == "dcp" else None
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.in_flight: Future | None = None

    def save(self, step: int, trainer_state: dict[str, Any], model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, ema: ExponentialMovingAverage | None) -> None:
        """`trainer_state`: what is not a tensor of the model, optimiser or EMA (step, config, data positions...),
        the same on every rank."""
        if self.format == "single":
            model_state, optimizer_state = full_state(model, optimizer)
            ema_state = gather_whole(ema.shadow, self.env.is_main) if ema is not None else None
            if self.env.is_main:
                state = {**trainer_state, "model": model_state, "optimizer": optimizer_state}
                if ema_state is not None:
                    state["ema"] = ema_state
                save_checkpoint(state, checkpoint_path(self.run_dir, step), self.keep_last, self.keep_every)
            return
        self.wait()  # one write at a time: the previous one commits before this one starts
        tensors, param_groups = sharded_state(model, optimizer)
        if ema is not None:
            tensors["ema"] = ema.shadow
        directory = checkpoint_path(self.run_dir, step, sharded=True)
        if self.env.is_main:
            _write_atomically({**trainer_state, "optimizer_param_groups": param_groups},
                              directory / TRAINER_STATE_FILE)
        upload = start_save(tensors, directory, self.group, self.stager)
        self.in_flight = self.writer.submit(self._finish, upload, directory)

    def _finish(self, upload: Future, directory: Path) -> None:
        upload.result()  # on rank 0: every rank's shards and the metadata are written
        if self.env.is_main:
            _commit(directory)
            rotate(self.run_dir, self.keep_last, self.keep_every)

    def wait(self) -> None:
        """Block until the write in flight (if any) is committed; raises what it raised."""
        if self.in_flight is not None:
            in_flight, self.in_flight = self.in_flight, None
            in_flight.result()

    def close(self) -> None:
        self.wait()
        self.writer.shutdown()
        if self.stager is not None:
            self.stager.close()

    def restore(self, path: Path, state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                ema: ExponentialMovingAverage | None) -> None:
        """Load the tensors of the checkpoint at `path` (whose trainer state is `state`) into this run's layout."""
        if path.is_dir():
            metadata = sharded_metadata(path)
            saved = {metadata.planner_data[key]: entry for key, entry in metadata.state_dict_metadata.items()}
            check_model_state(model, {path_[1]: torch.empty(entry.size, device="meta")
                                      for path_, entry in saved.items() if path_[0] == "model"}, path)
            has_ema = any(path_[0] == "ema" for path_ in saved)
            load_sharded(model, optimizer, state["optimizer_param_groups"],
                         ema.shadow if ema is not None and has_ema else None, path, self.group)
        else:
            check_model_state(model, state["model"], path)
            has_ema = "ema" in state
            load_full_state(model, optimizer, state["model"], state["optimizer"])
            if ema is not None and has_ema:
                load_whole(ema.shadow, state["ema"])
        if ema is not None and not has_ema:
            log.warning("%s holds no EMA weights: the average starts from the resumed weights", path)
            ema.reset()


def convert(source: str | Path, destination: str | Path) -> Path:
    """A single-file checkpoint to a sharded directory or back (the other format than `source`'s), in one
    process; the result resumes and loads like one written by training. Built on what
    torch.distributed.checkpoint.format_utils does (a DCP load or save without a process group), with our split
    of tensors (DCP files) from trainer state."""
    source, destination = Path(source), Path(destination)
    if destination.exists():
        raise InputError(f"{destination} exists; converting does not overwrite")
    state = load_checkpoint(source, sharded_parts=SHARDED_PARTS)  # a sharded one laid out as a single file's
    if source.is_dir():
        _write_atomically(state, destination)
        return destination
    optimizer = state.pop("optimizer")
    tensors = {"model": state.pop("model"), "optimizer": optimizer["state"]}
    if "ema" in state:
        tensors["ema"] = state.pop("ema")
    _write_atomically({**state, "optimizer_param_groups": optimizer["param_groups"]}, destination / TRAINER_STATE_FILE)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(destination), no_dist=True)
    _commit(destination)
    return destination
