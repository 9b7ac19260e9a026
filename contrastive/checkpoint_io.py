"""Checkpoints: where a run keeps them, finding them by step, and reading them safely (tensors and weights_only).

Two formats. A single file `step_N.pt` (torch.save, written by rank 0) holds everything. A sharded checkpoint is a
directory `step_N/`: torch.distributed.checkpoint (DCP) files with the tensors (model, optimiser state, EMA
weights), each rank's shards written by that rank, plus `trainer_state.pt` with everything else (step, config,
scheduler, data positions, RNG states, the optimiser's hyper-parameters). It exists only once its commit marker
is written, after DCP's metadata: a directory without one is a write that did not finish.

A leaf: models (pretrained weights, locked towers), training, evaluation and export all read checkpoints through
it, whole and in one process. Writing them, and reading them sharded, is training's business
(contrastive.train.checkpoint).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from contrastive.errors import InputError

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)(\.pt)?$")
COMMIT_MARKER = "COMMITTED"  # written into a sharded checkpoint last: without it, the directory is no checkpoint
TRAINER_STATE_FILE = "trainer_state.pt"
SHARDED_PARTS = ("model", "optimizer", "ema")  # the tensors a sharded checkpoint keeps in DCP files


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int, sharded: bool = False) -> Path:
    """`step_N.pt`, or with `sharded` the directory `step_N`."""
    return checkpoint_dir(run_dir) / (f"step_{step:08d}" if sharded else f"step_{step:08d}.pt")


def is_committed(path: str | Path) -> bool:
    """A single file is complete once it has its name; a sharded directory once it holds the commit marker."""
    path = Path(path)
    return (path / COMMIT_MARKER).is_file() if path.is_dir() else path.is_file()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint of either format, oldest first. Partial single-file writes never
    carry the final name; sharded directories count only once committed."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = []
    for match in filter(None, map(CHECKPOINT_PATTERN.match, os.listdir(directory))):
        path, single_file = directory / match.group(0), match.group(2) is not None
        if path.is_dir() != single_file and is_committed(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or sharded checkpoint directory, or a run directory (its newest checkpoint)."""
    path = Path(path)
    if path.is_dir() and not (path / TRAINER_STATE_FILE).is_file():
        found = list_checkpoints(path)
        if not found:
            raise InputError(f"run directory {path} holds no checkpoints (looked in {path / 'checkpoints'})")
        return found[-1][1]
    return path


def load_checkpoint(path: str | Path, sharded_parts: tuple[str, ...] = ("model", "ema")) -> dict[str, Any]:
    """Read a checkpoint of either format, whole, without executing pickled code; failures name the file and the
    reason. Of a sharded checkpoint only `sharded_parts` are read (the optimiser state, twice the model's size,
    only when asked for), and laid out as a single file's; a single file is read whole."""
    path = Path(path)
    if path.is_dir():
        if not is_committed(path):
            raise InputError(f"sharded checkpoint {path} has no {COMMIT_MARKER} marker: its write did not finish")
        state = _load_file(path / TRAINER_STATE_FILE)
        param_groups = state.pop("optimizer_param_groups", [])
        state.update(_read_sharded_tensors(path, sharded_parts))
        if "optimizer" in sharded_parts:
            state["optimizer"] = {"state": state.get("optimizer", {}), "param_groups": param_groups}
    else:
        state = _load_file(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise InputError(f"{path} is not a contrastive checkpoint (no model state or config)")
    return state


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Everything of a sharded checkpoint but its DCP tensors (which training reads sharded)."""
    path = Path(path)
    if not is_committed(path):
        raise InputError(f"sharded checkpoint {path} has no {COMMIT_MARKER} marker: its write did not finish")
    state = _load_file(path / TRAINER_STATE_FILE)
    if not isinstance(state, dict) or "config" not in state:
        raise InputError(f"{path} is not a contrastive checkpoint (no config)")
    return state


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        # Memory-mapped: the tensors are pages of the file (copy on write), shared through the page cache by every
        # rank of a node that reads the same checkpoint, instead of a private copy per rank.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise InputError(f"checkpoint {path} cannot be read (truncated, corrupt or not a contrastive checkpoint): "
                         f"{str(error).splitlines()[0]}") from error


def sharded_metadata(path: str | Path) -> Metadata:
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except Exception as error:  # a missing or foreign .metadata file
        raise InputError(f"sharded checkpoint {path} has no readable DCP metadata: "
                         f"{str(error).splitlines()[0]}") from error


def _read_sharded_tensors(path: Path, parts: tuple[str, ...]) -> dict[str, Any]:
    """The tensors of `parts`, whole, in this process, nested as they were saved ({"model": {name: tensor}, ...}).

    Only tensor entries are read: DCP unpickles other entries without weights_only, and our DCP files hold none.
    The nesting comes from DCP's own record of each flattened key's path (parameter names contain dots).
    """
    metadata = sharded_metadata(path)
    flat = {key: torch.empty(entry.size, dtype=entry.properties.dtype)
            for key, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata) and metadata.planner_data[key][0] in parts}
    try:
        with warnings.catch_warnings():  # DCP warns that no process group is initialised: one process is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(flat, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    except Exception as error:  # a missing or truncated shard file
        raise InputError(f"sharded checkpoint {path} cannot be read: {str(error).splitlines()[0]}") from error
    nested: dict[str, Any] = {}
    for key, tensor in flat.items():
        *parents, leaf = metadata.planner_data[key]
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = tensor
    return nested


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
