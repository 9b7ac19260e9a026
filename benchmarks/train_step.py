"""Throughput of our full training step against open_clip's own, on the same model, batch, loss, precision, threads.

    python benchmarks/train_step.py --json train_step.json
    python benchmarks/train_step.py --models tiny --repeats 20   # quick
    python benchmarks/train_step.py --device cuda --precision bf16 --models vit_b_16 --variants ''   # one GPU

Ours: `contrastive.train.step` forward/backward (model -> ModelOutput -> loss=clip), then
`contrastive.train.optim.optimizer_step` (gradient-norm clipping at optim.grad_clip_norm, the non-finite check,
AdamW over our parameter groups, zero_grad) and the schedule: the body of `Trainer.train`'s loop. Theirs: the
body of open_clip_train.train.train_one_epoch with accum_freq=1 and its defaults (no gradient clipping):
zero_grad, model(images, texts) -> ClipLoss -> backward, AdamW (its gain/bias groups), logit-scale clamp,
open_clip_train's cosine_lr schedule. Theirs is an open_clip `CLIP` built
from the same tower configs and loaded with our model's weights. bf16 is the trainer's `trainer.precision=bf16`
(torch.autocast to bfloat16) for ours and open_clip_train's own `--precision amp_bf16` autocast for theirs.

Each contender runs in a process of its own (benchmarks/train_step_contenders.py), as a training run would (at
most --concurrent at once; the variants take turns beside ours and open_clip): the processes take one step each
per round, in a rotating order, so machine noise hits all of them alike, and no contender's memory state affects
another's.
A step's time depends on where its process's memory happens to land, so every contender is started in
--processes fresh processes; figures are medians over all timed steps, after warm-up rounds. Ours is timed with
its defaults (fused AdamW) and with other settings: channels-last images and weights, AdamW's foreach or
per-tensor loop (open_clip's default on CPU), torch.compile of the model.

Host memory is a process setting, not part of either step, so every contender gets the same one: on CPU, Trainer's
default (`trainer.reuse_freed_host_memory`: freed blocks stay mapped, `contrastive/train/host_memory.py`). The
`glibc_memory` variant runs ours and open_clip again with glibc's default (large blocks unmapped when freed), which
gives the like-for-like ratio under either setting and the setting's own gain for each side.

On CUDA the processes share the GPU but step one at a time, and every step is timed between
`torch.cuda.synchronize()` calls. Per contender the run also reports its peak memory (CUDA:
`torch.cuda.max_memory_allocated`; CPU: the process's peak resident size) and MFU: model FLOPs per sample
(`contrastive.train.flops`, counted once on our model; the same for theirs) x samples/s / --peak-flops, which
defaults to 989e12 (dense bf16 on an H100/H200 SXM) on CUDA with bf16 and is otherwise unset (no MFU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from devices import DEVICES, PRECISIONS, default_peak_flops, describe_environment, memory_measure

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = Path(__file__).with_name("train_step_contenders.py")  # run once per contender and process


@dataclass(frozen=True)
class BenchModel:
    config: str  # conf/model/ file, relative to the repository
    cpu_batch: int
    cuda_batch: int  # estimated (not yet run) to fit ours and open_clip's bf16 processes on one 80 GB GPU together


MODELS = {
    "test_tiny": BenchModel("conf/model/test_tiny.yaml", 32, 256),
    "tiny": BenchModel("conf/model/tiny_clip.yaml", 128, 1024),
    "vit_b_32": BenchModel("conf/model/vit_b_32.yaml", 32, 512),
    "vit_b_16": BenchModel("conf/model/vit_b_16.yaml", 8, 256),
}
VARIANTS = ("channels_last", "foreach", "for_loop", "glibc_memory", "compile")
TARGET = 1.0


def start(contender: str, model_name: str, batch_size: int, args) -> subprocess.Popen:
    config = REPO / MODELS[model_name].config
    command = [sys.executable, str(CONTENDERS), "--contender", contender, "--config", str(config), "--batch-size",
               str(batch_size), "--precision", args.precision, "--threads", str(args.threads), "--device", args.device]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{contender} did not start: exit code {process.wait()}")
    return process


def ask(process: subprocess.Popen, request: str) -> float:
    process.stdin.write(f"{request}\n")
    process.stdin.flush()
    answer = process.stdout.readline()
    if not answer:
        raise RuntimeError(f"a contender's process died answering {request!r}: exit code {process.wait()}")
    return float(answer)


@dataclass
class Measurements:
    times: dict[str, list[float]]  # per contender, the timed steps of all its processes
    peak_bytes: dict[str, int]  # per contender, the highest of its processes
    flops_per_sample: float


def measure(contenders: list[str], model_name: str, batch_size: int, args) -> Measurements:
    """The contenders' processes step in turn; afterwards each reports its peak memory, and ours counts FLOPs."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    peaks: dict[str, int] = dict.fromkeys(contenders, 0)
    flops = 0.0
    for _ in range(args.processes):
        processes = {name: start(name, model_name, batch_size, args) for name in contenders}
        try:
            for round_index in range(args.warmup + args.repeats):
                shift = round_index % len(contenders)
                for name in contenders[shift:] + contenders[:shift]:
                    elapsed = ask(processes[name], "step")
                    if round_index >= args.warmup:
                        times[name].append(elapsed)
            for name, process in processes.items():
                peaks[name] = max(peaks[name], int(ask(process, "memory")))
            flops = flops or ask(processes["ours"], "flops")  # after the peaks: counting allocates too
        finally:
            for process in processes.values():
                process.stdin.close()
                process.wait()
    return Measurements(times, peaks, flops)


def benchmark(name: str, args) -> dict:
    """Variants run in groups beside ours and open_clip, so at most --concurrent processes hold a model at once."""
    device = torch.device(args.device)
    batch_size = args.batch_size or getattr(MODELS[name], f"{device.type}_batch")
    variants = [f"ours_{variant}" for variant in args.variants if variant]
    if "ours_glibc_memory" in variants:
        variants.append("open_clip_glibc_memory")
    per_group = max(1, args.concurrent - 2)
    groups = [variants[index:index + per_group] for index in range(0, len(variants), per_group)] or [[]]
    times: dict[str, list[float]] = {}
    peaks: dict[str, int] = {}
    flops = 0.0
    for group in groups:
        measured = measure(["ours", "open_clip", *group], name, batch_size, args)
        for contender, values in measured.times.items():
            times.setdefault(contender, []).extend(values)
            peaks[contender] = max(peaks.get(contender, 0), measured.peak_bytes[contender])
        flops = measured.flops_per_sample
    medians = {contender: statistics.median(values) for contender, values in times.items()}
    samples_per_second = {contender: batch_size / seconds for contender, seconds in medians.items()}
    reference = samples_per_second["open_clip"]
    peak_flops = args.peak_flops or default_peak_flops(device, args.precision)
    return {
        "model": name, "batch_size": batch_size, "precision": args.precision, "device": args.device,
        "threads": args.threads, "processes": args.processes, "repeats": args.repeats,
        "median_step_seconds": medians,
        "samples_per_second": samples_per_second,
        "throughput_ratio_vs_open_clip": {c: s / reference for c, s in samples_per_second.items()},
        "flops_per_sample": flops,
        "peak_flops_per_second": peak_flops,
        "mfu": {c: flops * s / peak_flops for c, s in samples_per_second.items()} if peak_flops else None,
        "memory_measure": memory_measure(device),
        "peak_memory_mib": {c: value / 2**20 for c, value in peaks.items()},
        "memory_ratio_vs_open_clip": {c: value / peaks["open_clip"] for c, value in peaks.items()},
        **host_memory_figures(samples_per_second),
    }


def host_memory_figures(samples_per_second: dict[str, float]) -> dict:
    """Ours against open_clip with both processes under the same host-memory setting, and what the setting
    itself gains each side (reused / glibc's default); empty without the glibc_memory variant."""
    if "ours_glibc_memory" not in samples_per_second:
        return {}
    rate = samples_per_second
    return {
        "like_for_like_ratio": {"reuse_freed_host_memory": rate["ours"] / rate["open_clip"],
                                "glibc_default": rate["ours_glibc_memory"] / rate["open_clip_glibc_memory"]},
        "reuse_freed_host_memory_gain": {"ours": rate["ours"] / rate["ours_glibc_memory"],
                                         "open_clip": rate["open_clip"] / rate["open_clip_glibc_memory"]},
    }


def print_result(result: dict) -> None:
    print(f"\n{result['model']}, batch {result['batch_size']}, {result['precision']}, {result['device']}, "
          f"{result['threads']} threads, median of {result['processes']} processes x {result['repeats']} "
          f"interleaved steps; {result['flops_per_sample'] / 1e9:.2f} GFLOP per sample")
    print(f"{'contender':<24} {'s/step':>8} {'samples/s':>10} {'vs open_clip':>13} {'MFU':>7} "
          f"{'peak MiB':>9} {'memory x':>9}")
    for contender, seconds in result["median_step_seconds"].items():
        mfu = f"{result['mfu'][contender]:7.1%}" if result["mfu"] else f"{'-':>7}"
        print(f"{contender:<24} {seconds:8.4f} {result['samples_per_second'][contender]:10.1f} "
              f"{result['throughput_ratio_vs_open_clip'][contender]:12.3f}x {mfu} "
              f"{result['peak_memory_mib'][contender]:9.0f} {result['memory_ratio_vs_open_clip'][contender]:8.3f}x")
    ratio = result["throughput_ratio_vs_open_clip"]["ours"]
    print(f"ours (defaults) / open_clip, same host-memory setting = {ratio:.3f}x (target >= {TARGET}x): "
          f"{'met' if ratio >= TARGET else 'NOT met'}")
    if "like_for_like_ratio" in result:
        same, gain = result["like_for_like_ratio"], result["reuse_freed_host_memory_gain"]
        print(f"ours / open_clip, both glibc's default host memory: {same['glibc_default']:.3f}x; "
              f"reusing freed host memory speeds up ours {gain['ours']:.3f}x, open_clip {gain['open_clip']:.3f}x")
    print(f"peak memory: {result['memory_measure']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,vit_b_32", help=f"comma-separated, from {', '.join(MODELS)}")
    defaults = ", ".join(f"{name} {spec.cpu_batch} (cpu) / {spec.cuda_batch} (cuda)" for name, spec in MODELS.items())
    parser.add_argument("--batch-size", type=int, default=0, help=f"0: the model's default for the device: {defaults}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"ours with other settings: {VARIANTS}")
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s of one device at --precision, for MFU; default 989e12 (H100/H200 SXM dense "
                             "bf16) with --device cuda --precision bf16, else none")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrent", type=int, default=4,
                        help="processes alive at once (memory): variants run in groups beside ours and open_clip")
    parser.add_argument("--processes", type=int, default=2, help="fresh processes per contender, one after another")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per process (one step per contender)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compile happens here)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS) - {""}
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {', '.join(MODELS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    results = []
    for name in args.models.split(","):  # each model's figures printed and written as soon as it is measured
        results.append(benchmark(name, args))
        print_result(results[-1])
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"target_ratio": TARGET, "environment": describe_environment(), "results": results},
                          handle, indent=2)


if __name__ == "__main__":
    main()
