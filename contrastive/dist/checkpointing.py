"""Sharded checkpoints across ranks with torch.distributed.checkpoint (DCP): every rank writes its own shards of
the model, optimiser and EMA weights, asynchronously, and reads any layout back (DCP reshards to this run's world
size and strategy). Also the whole-tensor gathers and scatters the single-file format needs for the EMA weights.

The model and optimiser states come from torch's state_dict helpers: keyed by parameter name, sharded as FSDP2
holds them (DTensors), whole under DDP or one process. The optimiser's hyper-parameters (its param_groups) are not
tensors; the caller keeps them beside the DCP files, so DCP's files hold tensors only.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from contrastive.dist.parallel import drop_unsaved_optimizer_state


def checkpoint_process_group() -> dist.ProcessGroup | None:
    """A gloo group of every rank for DCP's save and load collectives; None in a single process. Every rank calls
    this at the same point (it is a collective).

    An async save runs its collectives (gathering the write plans, then the results) in a background thread while
    training runs its own collectives on the default group. Two threads must not interleave collectives on one
    group, and under nccl the default group would also move the plans through the GPU: a group of its own, on
    gloo, keeps them apart and on the host.
    """
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict]]:
    """({"model": {name: tensor}, "optimizer": {name: {state key: tensor}}}, the optimiser's param_groups), as this
    rank holds them: no gather. The tensors are the live ones; a save snapshots them (`start_save`)."""
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    return {"model": get_model_state_dict(model), "optimizer": optimizer_state["state"]}, \
        optimizer_state["param_groups"]


def snapshot_stager(device: torch.device) -> DefaultStager:
    """Copies this rank's shards to host memory before the write starts, so training can go on changing them. On
    CUDA into pinned memory that the stager keeps for the next save (the copy then runs at full PCIe speed and
    allocates nothing); on CPU into plain memory."""
    cuda = device.type == "cuda"
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=False))


def start_save(tensors: dict[str, Any], directory: Path, group: dist.ProcessGroup | None,
               stager: DefaultStager) -> Future:
    """Snapshot `tensors` (every rank calls this; returns once the snapshot is taken) and write them to `directory`
    in a background thread. The future completes on each rank once its shards are written, and on rank 0 (DCP's
    coordinator) once the metadata that names every rank's shards is written too."""
    return dcp.async_save(tensors, storage_writer=dcp.FileSystemWriter(directory), process_group=group,
                          async_stager=stager, no_dist=group is None)


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, param_groups: list[dict],
                 ema_shadow: dict[str, torch.Tensor] | None, directory: Path, group: dist.ProcessGroup | None) -> None:
    """Read a sharded checkpoint into the model, the optimiser and (when given) the EMA tensors, in place; each
    rank reads the parts of the saved shards that overlap its own. Every rank calls this."""
    model_state = get_model_state_dict(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer)  # creates the optimiser's state to read into
    # Parameters that never had a gradient (self-distillation's heads before its switch) have no saved state.
    reader = dcp.FileSystemReader(directory)
    saved_keys = reader.read_metadata().state_dict_metadata.keys()
    saved_names = {name for name in optimizer_state["state"]
                   if any(key.startswith(f"optimizer.{name}.") for key in saved_keys)}
    optimizer_state["state"] = {name: optimizer_state["state"][name] for name in saved_names}
    target = {"model": model_state, "optimizer": optimizer_state["state"]}
    if ema_shadow is not None:
        target["ema"] = ema_shadow
    with warnings.catch_warnings():  # DCP warns that no process group is initialised: one process is the intent
        warnings.simplefilter("ignore" if group is None else "default", UserWarning)
        dcp.load(target, storage_reader=reader, process_group=group, no_dist=group is None)
    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, optimizer, {"state": optimizer_state["state"], "param_groups": param_groups},
                             options=StateDictOptions(strict=False))
    drop_unsaved_optimizer_state(model, optimizer, saved_names.__contains__)


def gather_whole(tensors: dict[str, torch.Tensor], is_main: bool) -> dict[str, torch.Tensor]:
    """Whole copies on CPU of possibly sharded tensors, on rank 0 (empty elsewhere). Every rank calls this: a
    sharded tensor is gathered one at a time, so no rank holds more than one whole tensor on its device."""
    whole = {}
    for name, tensor in tensors.items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if is_main:
            whole[name] = full.detach().cpu().clone()
    return whole


@torch.no_grad()
def load_whole(targets: dict[str, torch.Tensor], whole: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (every rank has them) into `targets`; a sharded target keeps its own shard, cut locally
    without communication."""
    for name, target in targets.items():
        source = whole[name].to(target.device, target.dtype)
        if isinstance(target, DTensor):
            source = distribute_tensor(source, target.device_mesh, target.placements, src_data_rank=None)
        target.copy_(source)
