"""Peak memory and time of a contrastive loss's forward + backward: ours (blockwise) against open_clip, same run.

    torchrun --nproc_per_node=2 benchmarks/loss_memory.py --json loss_memory.json
    torchrun --nproc_per_node=2 benchmarks/loss_memory.py --batches 1024,4096  # skip 8192 on a slow machine
    torchrun --nproc_per_node=1 benchmarks/loss_memory.py --device cuda --batches 16384,32768  # one GPU, nccl

Compared, per local batch B and feature dim D: our `loss=clip` with `loss.block_size` against open_clip's
`ClipLoss(local_loss=True, gather_with_grad=True)`, and our `loss=siglip` with `loss.block_size` against
open_clip's `SigLipLoss(dist_impl="bidir")`, on the same fp32 features, on every rank of the torchrun group
(gloo on CPU, nccl on CUDA: `contrastive.dist.init_distributed`'s automatic backend).

Memory is the peak a forward + backward allocates on top of its inputs (the features, made beforehand, and
anything else already allocated are not counted; their gradients are), the maximum over ranks.
On CUDA: `torch.cuda.max_memory_allocated` after `torch.cuda.reset_peak_memory_stats`, minus what was allocated
before. On CPU torch has no such counter, tracemalloc does not see torch's allocator, and RSS high-water marks
include the interpreter and are blurred by malloc's caching. So there each measurement runs once under
`torch.profiler` with `profile_memory=True`, which records every allocation and free of torch's CPU allocator
with its size and time; replaying them in time order gives the live bytes over the forward + backward.
Time: median wall time of `--repeats` forward + backward passes (ours and open_clip's interleaved, after one
warm-up each, without the profiler, synchronised on CUDA), the maximum over ranks.
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial

import open_clip.loss
import torch
import torch.nn.functional as F
from devices import DEVICES, describe_environment, synchronize, timed
from torch.profiler import ProfilerActivity, profile

from contrastive.config import LossConfig
from contrastive.dist import init_distributed, shutdown_distributed
from contrastive.losses import build_loss
from contrastive.types import Batch, ModelOutput

TARGET_BATCH, MEMORY_TARGET, TIME_TARGET = 4096, 0.25, 1.1


def our_loss(name: str, block_size: int, collectives):
    objective = build_loss(LossConfig(name=name, block_size=block_size))

    def compute(images, texts, scale, bias):
        output = ModelOutput(image_features=images, text_features=texts, logit_scale=scale, logit_bias=bias)
        return objective(output, Batch(images=images, tokens=texts), collectives).loss

    return compute


def open_clip_loss(name: str, rank: int, world_size: int):
    if name == "siglip":
        return open_clip.loss.SigLipLoss(rank=rank, world_size=world_size, dist_impl="bidir")
    clip = open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    return lambda images, texts, scale, bias: clip(images, texts, scale)


def clear_grads(inputs) -> None:
    for tensor in inputs:
        tensor.grad = None


def forward_backward(compute, inputs) -> None:
    clear_grads(inputs)
    compute(*inputs).backward()


def profiled_peak_bytes(compute, inputs) -> int:
    """CPU: highest net bytes torch's CPU allocator holds during one forward + backward (see module docstring)."""
    clear_grads(inputs)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        forward_backward(compute, inputs)
    events = sorted((event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
                    if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:  # frees are negative
        live += nbytes
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(compute, inputs, device: torch.device) -> int:
    """CUDA: the allocator's high-water mark during one forward + backward, less what was allocated before it."""
    clear_grads(inputs)
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    forward_backward(compute, inputs)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_allocated_bytes(compute, inputs, device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_peak_bytes(compute, inputs, device)
    return profiled_peak_bytes(compute, inputs)


def measure(name: str, local_batch: int, args, env) -> dict:
    generator = torch.Generator().manual_seed(env.rank)
    features = [F.normalize(torch.randn(local_batch, args.dim, generator=generator), dim=-1) for _ in range(2)]
    images, texts = (tensor.to(env.device).requires_grad_(True) for tensor in features)
    scalars = (torch.tensor(value, device=env.device, requires_grad=True) for value in (10.0, -10.0))
    inputs = (images, texts, *scalars)
    candidates = {"ours": our_loss(name, args.block_size, env.collectives),
                  "open_clip": open_clip_loss(name, env.rank, env.world_size)}

    def pass_on_every_rank(compute) -> None:
        forward_backward(compute, inputs)
        env.collectives.barrier()  # the pass takes as long as its slowest rank

    times: dict[str, list[float]] = {label: [] for label in candidates}
    for repeat in range(args.repeats + 1):
        for label, compute in candidates.items():
            env.collectives.barrier()
            elapsed = timed(partial(pass_on_every_rank, compute), env.device)
            if repeat > 0:  # the first pass is a warm-up
                times[label].append(elapsed)
    row = {"loss": name, "local_batch": local_batch}
    for label, compute in candidates.items():
        env.collectives.barrier()
        peak = max(env.collectives.all_gather_object(peak_allocated_bytes(compute, inputs, env.device)))
        row[f"{label}_peak_mib"] = peak / 2**20
        row[f"{label}_time_s"] = max(env.collectives.all_gather_object(statistics.median(times[label])))
    row["memory_ratio"] = row["ours_peak_mib"] / row["open_clip_peak_mib"]
    row["time_ratio"] = row["ours_time_s"] / row["open_clip_time_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1024,4096,8192", help="comma-separated local batch sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=1024, help="our loss.block_size")
    parser.add_argument("--losses", default="clip,siglip")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--device", default="cpu", choices=DEVICES, help="cuda: each rank on its LOCAL_RANK's GPU")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = init_distributed(args.device, "auto")
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    rows = []
    header = (f"{'loss':<7} {'B_local':>7} {'ours ms':>9} {'open_clip ms':>12} {'time x':>7} "
              f"{'ours MiB':>9} {'open_clip MiB':>13} {'memory x':>8}")
    memory_measure = ("torch.cuda.max_memory_allocated above the inputs" if env.device.type == "cuda"
                      else "torch.profiler replay of torch's CPU allocations above the inputs")
    if env.is_main:
        print(f"world_size={env.world_size} device={env.device} backend={backend} dim={args.dim} "
              f"block_size={args.block_size} threads/rank={args.threads}")
        print(header, flush=True)
    for local_batch in [int(batch) for batch in args.batches.split(",")]:
        for name in args.losses.split(","):
            row = measure(name, local_batch, args, env)
            rows.append(row)
            if env.is_main:
                print(f"{name:<7} {local_batch:>7} {row['ours_time_s'] * 1e3:>9.0f} "
                      f"{row['open_clip_time_s'] * 1e3:>12.0f} {row['time_ratio']:>7.2f} {row['ours_peak_mib']:>9.1f} "
                      f"{row['open_clip_peak_mib']:>13.1f} {row['memory_ratio']:>8.3f}", flush=True)
    if env.is_main:
        at_target = [row for row in rows if row["local_batch"] == TARGET_BATCH]
        for row in at_target:
            met = row["memory_ratio"] <= MEMORY_TARGET and row["time_ratio"] <= TIME_TARGET
            print(f"target at B_local={TARGET_BATCH} ({row['loss']}): memory <= {MEMORY_TARGET}x and time <= "
                  f"{TIME_TARGET}x: {'met' if met else 'NOT met'}")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"world_size": env.world_size, "device": env.device.type, "backend": backend,
                           "dim": args.dim, "block_size": args.block_size, "threads_per_rank": args.threads,
                           "repeats": args.repeats, "memory_measure": memory_measure,
                           "environment": describe_environment(),
                           "targets": {"local_batch": TARGET_BATCH, "memory_ratio": MEMORY_TARGET,
                                       "time_ratio": TIME_TARGET},
                           "rows": rows}, handle, indent=2)
    shutdown_distributed()


if __name__ == "__main__":
    main()
