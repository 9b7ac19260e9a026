"""Checkpoint cost under FSDP2: single file (rank 0 gathers and writes) against sharded DCP (every rank snapshots
its shards and writes them in the background), same model and optimiser state, same run.

    torchrun --nproc_per_node=2 benchmarks/checkpoint.py --json checkpoint.json  # 318M parameters
    torchrun --nproc_per_node=2 benchmarks/checkpoint.py --model conf/model/test_tiny.yaml  # a quick smoke run

The default model: CLIP with open_clip's ViT-L-14 image tower (304M parameters) and a 1-layer, 256-wide text
tower, 318M in all (the whole ViT-L-14 needs more host memory than a shared 24 GiB machine has for two ranks).
Random weights and an AdamW state made by one optimiser step on random gradients, so the state is the size of
training's (weights + two moments; the gradients stay resident and are not saved). Each format saves `--repeats` times
through the trainer's own `contrastive.train.checkpoint.Checkpointer`, into a fresh directory per save:

- stall: the wall time from the save call until every rank may take its next step (a barrier after the call, as
  the next step's first collective would be), the maximum over ranks; the median over repeats. For DCP the
  background write then runs alongside `--steps-during-write` simulated optimiser steps, as training would.
- extra rank-0 host memory: the peak resident set size of rank 0 (sampled every millisecond from /proc) from the
  save call until the write is complete (committed), minus the resident size just before the call; the maximum
  over repeats. What was resident before is the training state itself. So that the resident size is the memory
  in use, every block from 64 KiB up is mmap'd and returned to the kernel when freed (glibc's M_MMAP_THRESHOLD):
  otherwise glibc keeps freed blocks, and a format measured after another would reuse what that one freed.
- load: the wall time of reading the checkpoint back into the (sharded) model and optimiser, resume's path.

Targets (issue 19): DCP's stall at most 0.25x the single file's, its extra rank-0 memory at most 0.5x.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from devices import DEVICES, describe_environment, synchronize
from omegaconf import OmegaConf

from contrastive.checkpoint_io import checkpoint_path
from contrastive.config import ModelConfig
from contrastive.dist import init_distributed, shutdown_distributed
from contrastive.dist.parallel import parallelize
from contrastive.models import build_model
from contrastive.train.checkpoint import Checkpointer, load_resume_state

STALL_TARGET, MEMORY_TARGET = 0.25, 0.5
PAGE = os.sysconf("SC_PAGE_SIZE")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_freed_memory_to_the_kernel() -> bool:
    """Serve blocks from 64 KiB up with their own mmap, unmapped on free (fixed: glibc's threshold otherwise grows
    up to 32 MiB as blocks are freed), so the resident size counts only memory in use. False where not glibc."""
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 64 * 1024))
    except (OSError, AttributeError, TypeError):
        return False


class PeakResidentMemory:
    """The peak resident set size of this process while the block runs, sampled from /proc/self/statm."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * PAGE

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakResidentMemory:
        self.peak = self.now()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def barrier_max(value: float, device: torch.device) -> float:
    """The maximum of `value` over ranks (also a barrier)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def barrier(device: torch.device) -> None:
    barrier_max(0.0, device)


@torch.no_grad()
def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """What a step does to the saved state: new gradients (in place, as backward accumulates into the resident
    ones), one optimiser update (weights and moments change)."""
    for parameter in model.parameters():
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        parameter.grad.normal_(std=1e-3)
    optimizer.step()


def measure(checkpoint_format: str, model, optimizer, env, args, root: Path) -> dict:
    stalls, extra_memory, loads = [], [], []
    for repeat in range(args.repeats):
        run_dir = root / f"{checkpoint_format}_{repeat}"
        checkpointer = Checkpointer(run_dir, checkpoint_format, env, keep_last=1, keep_every=None)
        trainer_state = {"step": repeat + 1, "config": {}, "world_size": env.world_size}
        synchronize(env.device)
        barrier(env.device)
        with PeakResidentMemory() as memory:
            resident_before = memory.now()
            start = time.perf_counter()
            checkpointer.save(repeat + 1, trainer_state, model, optimizer, None)
            synchronize(env.device)
            barrier(env.device)  # the next step's first collective: ranks that finished early wait for rank 0 here
            stall = barrier_max(time.perf_counter() - start, env.device)
            if checkpoint_format == "dcp":
                for _ in range(args.steps_during_write):
                    training_step(model, optimizer)
            checkpointer.close()
        barrier(env.device)
        stalls.append(stall)
        extra_memory.append(memory.peak - resident_before)
        path = checkpoint_path(run_dir, repeat + 1, sharded=checkpoint_format == "dcp")
        _, state = load_resume_state(str(path), run_dir)
        synchronize(env.device)
        barrier(env.device)
        start = time.perf_counter()
        checkpointer.restore(path, state, model, optimizer, None)
        synchronize(env.device)
        loads.append(barrier_max(time.perf_counter() - start, env.device))
        del state
        barrier(env.device)
        if env.is_main:
            shutil.rmtree(run_dir)
    return {"format": checkpoint_format, "stall_s": statistics.median(stalls), "stalls_s": stalls,
            "extra_rank0_host_bytes": max(extra_memory), "extra_rank0_host_bytes_per_repeat": extra_memory,
            "load_s": statistics.median(loads), "loads_s": loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--open-clip-name", default="ViT-L-14", help="open_clip model config (random weights)")
    parser.add_argument("--text-layers", type=int, default=1, help="text tower depth")
    parser.add_argument("--text-width", type=int, default=256, help="text tower width (heads of 64)")
    parser.add_argument("--model", default=None, help="a conf/model yaml instead of the two above")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps-during-write", type=int, default=1, help="DCP: simulated steps while it writes")
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary dir)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    exact_resident_size = return_freed_memory_to_the_kernel()
    torch.set_num_threads(args.threads)
    env = init_distributed(args.device, "auto")
    text = {"layers": args.text_layers, "width": args.text_width, "heads": args.text_width // 64}
    default = {"open_clip_name": args.open_clip_name, "text": text}
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(args.model) if args.model else default)
    torch.manual_seed(0)
    model = build_model(OmegaConf.to_object(cfg)).to(env.device)
    parameters = sum(p.numel() for p in model.parameters())
    model = parallelize(model, env, "fsdp")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    training_step(model, optimizer)
    root = Path(args.dir or tempfile.gettempdir()) / f"checkpoint_benchmark_{os.environ.get('MASTER_PORT', 'one')}"
    if env.is_main:
        print(f"world_size={env.world_size} device={env.device} parameters={parameters:,} "
              f"resident rank-0 state={PeakResidentMemory.now() / 2**30:.2f} GiB", flush=True)
    rows = {name: measure(name, model, optimizer, env, args, root) for name in ("single", "dcp")}
    if not env.is_main:
        shutdown_distributed()
        return
    single, sharded = rows["single"], rows["dcp"]
    ratios = {"stall": sharded["stall_s"] / single["stall_s"],
              "extra_rank0_host_memory": sharded["extra_rank0_host_bytes"] / max(single["extra_rank0_host_bytes"], 1),
              "load": sharded["load_s"] / single["load_s"]}
    for row in rows.values():
        print(f"{row['format']:<7} stall {row['stall_s']:7.2f} s   extra rank-0 memory "
              f"{row['extra_rank0_host_bytes'] / 2**30:6.2f} GiB   load {row['load_s']:7.2f} s")
    print(f"dcp / single: stall {ratios['stall']:.3f}x (target <= {STALL_TARGET}), extra rank-0 memory "
          f"{ratios['extra_rank0_host_memory']:.3f}x (target <= {MEMORY_TARGET}), load {ratios['load']:.3f}x")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        with open(args.json, "w") as handle:
            json.dump({"command": " ".join(["torchrun", f"--nproc_per_node={env.world_size}", *sys.argv]),
                       "commit": commit, "world_size": env.world_size, "device": env.device.type,
                       "model": args.model or f"{args.open_clip_name} image tower, text tower {text}",
                       "parameters": parameters,
                       "repeats": args.repeats, "environment": describe_environment(),
                       "freed_memory_returned_to_the_kernel": exact_resident_size,
                       "targets": {"stall_ratio": STALL_TARGET, "extra_rank0_host_memory_ratio": MEMORY_TARGET},
                       "ratios": ratios, "rows": list(rows.values())}, handle, indent=2)
    shutdown_distributed()


if __name__ == "__main__":
    main()
