"""The parts of `benchmarks/gpu_check.py`: what each runs at which size, and how its figures are read and checked.

Every part writes its figures to a file (the demo data's info.json, the run's metrics.jsonl, the evaluation's and
the benchmarks' JSON); reading them back is the check that the part did its job, and a figure that is missing,
not finite, or below its target fails the part with a one-line reason.
"""

from __future__ import annotations

import json
import math
import socket
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ACCURACY_TARGET = 0.80  # the demo reaches ~0.87 zero-shot acc1 (README); below 0.80 something is wrong
PRECISION = "bf16"  # the trainer's trainer.precision=bf16 and the benchmarks' --precision bf16


class CheckFailed(Exception):
    """A part ran, but its figures are missing or wrong; the message says which."""


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the real check on CUDA, a smoke run of the same code paths on CPU."""

    data: tuple[str, ...]  # `contrastive-data demo` arguments
    demo: tuple[str, ...]  # training overrides on top of experiment=demo
    data_workers: int  # loader workers per rank, at most (epoch mode needs a shard per rank and worker)
    accuracy_target: float | None  # None: not checked (a few steps of a tiny model learn nothing)
    eval: tuple[str, ...]  # `contrastive-eval zeroshot` arguments
    train_step: tuple[str, ...]  # benchmarks/train_step.py arguments
    loss_memory: tuple[str, ...]  # benchmarks/loss_memory.py arguments
    device_decode: tuple[str, ...]  # benchmarks/device_decode.py arguments


SIZES = {
    "cuda": Sizes(
        data=("--samples-per-shard", "1000"),  # 60 train shards: slots for 8 GPUs x 4 workers, and more
        demo=(f"trainer.precision={PRECISION}",),  # the demo's own 400 steps of 256
        data_workers=4,
        accuracy_target=ACCURACY_TARGET,
        eval=("--workers", "4", "--batch-size", "500"),
        train_step=("--models", "vit_b_16", "--batch-size", "256", "--processes", "2", "--warmup", "3",
                    "--repeats", "10", "--threads", "4"),
        loss_memory=("--batches", "16384,32768", "--repeats", "3"),
        device_decode=("--samples", "2048", "--batch-size", "256", "--workers", "4", "--batches", "16"),
    ),
    "cpu": Sizes(
        data=("--samples-per-shard", "128", "--limit", "512"),
        demo=(f"trainer.precision={PRECISION}", "model=test_tiny", "data.batch_size=64", "data.shuffle_buffer=256",
              "trainer.max_steps=8", "trainer.log_every=4", "trainer.checkpoint_every=8", "optim.warmup_steps=2",
              "trainer.threads_per_process=1"),
        data_workers=1,
        accuracy_target=None,
        eval=("--workers", "0", "--batch-size", "256", "--threads", "2"),
        train_step=("--models", "test_tiny", "--processes", "1", "--warmup", "1", "--repeats", "3", "--threads", "1"),
        loss_memory=("--batches", "256", "--repeats", "1"),
        device_decode=("--samples", "32", "--batch-size", "8", "--workers", "1", "--batches", "1"),
    ),
}


@dataclass(frozen=True)
class Context:
    device: str  # cuda | cpu
    sizes: Sizes
    work_dir: Path
    nproc: int  # training ranks

    @property
    def data_dir(self) -> Path:
        return self.work_dir / "data" / f"fashion-mnist-{self.device}"  # sizes differ: one directory each

    @property
    def run_dir(self) -> Path:
        return self.work_dir / "demo_run"

    def output(self, part: str) -> Path:
        return self.work_dir / f"{part}.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}"]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckFailed(f"cannot read {path}: {error}") from None


def positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckFailed(f"{what} is {value!r}, not a finite positive number")
    return value


def demo_data_command(context: Context) -> list[str]:
    return [sys.executable, "-m", "contrastive.cli.data", "demo", "--out", str(context.data_dir), *context.sizes.data]


def read_demo_data(context: Context) -> dict:
    info = read_json(context.data_dir / "info.json")
    splits = info["splits"]
    return {"source": info["source"]["name"], "source_path": info["source"]["path"],
            "fell_back_to_digits": info["source"]["fell_back"], "root": str(context.data_dir),
            **{f"{split}_samples": splits[split]["count"] for split in splits},
            **{f"{split}_shards": splits[split]["shards"] for split in splits}}


def demo_train_command(context: Context) -> list[str]:
    shards = read_json(context.data_dir / "info.json")["splits"]["train"]["shards"]
    workers = max(1, min(context.sizes.data_workers, shards // context.nproc))
    return [*torchrun(context.nproc), "-m", "contrastive.cli.train", "experiment=demo", "name=gpu_check_demo",
            f"run_dir={context.run_dir}", f"data.sources.0.shards={context.data_dir / 'train'}",
            f"data.num_workers={workers}", f"dist.device={context.device}", "eval=none", "logger=disabled",
            "trainer.progress_bar=false", *context.sizes.demo]


def read_demo_train(context: Context) -> dict:
    path = context.run_dir / "metrics.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        raise CheckFailed(f"cannot read {path}: {error}") from None
    rows = [row for row in rows if "loss" in row]
    if not rows:
        raise CheckFailed(f"{path} holds no training metrics")
    speeds = [row["samples_per_second"] for row in rows[1:] or rows]  # the first window includes start-up
    return {"ranks": context.nproc, "device": context.device, "precision": PRECISION, "steps": rows[-1]["step"],
            "final_loss": positive(rows[-1]["loss"], "the final loss"),
            "samples_per_second": positive(statistics.median(speeds), "samples/s")}


def demo_zeroshot_command(context: Context) -> list[str]:
    return [sys.executable, "-m", "contrastive.cli.eval", "zeroshot", "--checkpoint", str(context.run_dir),
            "--dataset-root", str(context.data_dir), "--output", str(context.output("zeroshot")),
            "--device", context.device, "--no-progress", *context.sizes.eval]


def read_demo_zeroshot(context: Context) -> dict:
    metrics = read_json(context.output("zeroshot"))["metrics"]
    acc1, target = metrics.get("acc1"), context.sizes.accuracy_target
    if isinstance(acc1, bool) or not isinstance(acc1, (int, float)) or not 0 <= acc1 <= 1:
        raise CheckFailed(f"acc1 is {acc1!r}, not a fraction")
    if target is not None and acc1 < target:
        raise CheckFailed(f"zero-shot acc1 {acc1:.4f} is below the demo's {target}")
    return {**metrics, "target_acc1": target, "accuracy_checked": target is not None}


def train_step_command(context: Context) -> list[str]:
    return [sys.executable, str(Path(__file__).with_name("train_step.py")), "--device", context.device,
            "--precision", PRECISION, "--variants", "", "--json", str(context.output("train_step")),
            *context.sizes.train_step]


def read_train_step(context: Context) -> dict:
    result = read_json(context.output("train_step"))["results"][0]
    for contender in ("ours", "open_clip"):
        positive(result["samples_per_second"][contender], f"{contender} samples/s")
        positive(result["peak_memory_mib"][contender], f"{contender} peak memory")
    positive(result["throughput_ratio_vs_open_clip"]["ours"], "the throughput ratio")
    positive(result["flops_per_sample"], "FLOPs per sample")
    keep = ("model", "batch_size", "precision", "device", "samples_per_second", "throughput_ratio_vs_open_clip",
            "flops_per_sample", "peak_flops_per_second", "mfu", "memory_measure", "peak_memory_mib",
            "memory_ratio_vs_open_clip")
    return {key: result[key] for key in keep}


def loss_memory_command(context: Context) -> list[str]:
    script = str(Path(__file__).with_name("loss_memory.py"))
    return [*torchrun(1), script, "--device", context.device, "--json", str(context.output("loss_memory")),
            *context.sizes.loss_memory]


def read_loss_memory(context: Context) -> dict:
    report = read_json(context.output("loss_memory"))
    for row in report["rows"]:
        for key in ("ours_peak_mib", "open_clip_peak_mib", "ours_time_s", "open_clip_time_s"):
            positive(row[key], f"{row['loss']} at {row['local_batch']}: {key}")
    return {key: report[key] for key in ("world_size", "device", "backend", "dim", "block_size", "memory_measure",
                                         "rows")}


def device_decode_command(context: Context) -> list[str]:
    return [sys.executable, str(Path(__file__).with_name("device_decode.py")), "--device", context.device,
            "--shards-dir", str(context.work_dir / "throughput_shards"), "--json", str(context.output("device_decode")),
            *context.sizes.device_decode]


def read_device_decode(context: Context) -> dict:
    report = read_json(context.output("device_decode"))
    for key in ("cpu_workers_images_per_second", "device_decode_images_per_second", "ratio"):
        positive(report[key], key)
    if not 0 <= report["mae"] < report["max_mae"]:
        raise CheckFailed(f"device decode MAE {report['mae']!r} is not under {report['max_mae']}")
    return {key: report[key] for key in ("device", "workers", "batch_size", "cpu_workers_images_per_second",
                                         "device_decode_images_per_second", "ratio", "mae", "max_mae")}


def describe_demo_data(figures: dict) -> str:
    source = "scikit-learn digits (FELL BACK)" if figures["fell_back_to_digits"] else figures["source_path"]
    return f"{figures['train_samples']} train / {figures['test_samples']} test samples from {source}"


def describe_demo_train(figures: dict) -> str:
    return (f"{figures['ranks']} rank(s) on {figures['device']}, {figures['precision']}: {figures['steps']} steps, "
            f"final loss {figures['final_loss']:.3f}, {figures['samples_per_second']:.0f} samples/s")


def describe_demo_zeroshot(figures: dict) -> str:
    target = (f"target >= {figures['target_acc1']}: met" if figures["accuracy_checked"]
              else "target not checked at smoke sizes")
    return f"acc1 {figures['acc1']:.4f}; {target}"


def describe_train_step(figures: dict) -> str:
    speed, memory = figures["samples_per_second"], figures["peak_memory_mib"]
    mfu = (f", MFU {figures['mfu']['ours']:.1%} vs {figures['mfu']['open_clip']:.1%}" if figures["mfu"] else
           ", MFU not computed (no peak FLOP/s for this device)")
    return (f"{figures['model']} batch {figures['batch_size']} {figures['precision']}: ours {speed['ours']:.0f} "
            f"samples/s, open_clip {speed['open_clip']:.0f} ({figures['throughput_ratio_vs_open_clip']['ours']:.2f}x)"
            f"{mfu}; peak {memory['ours']:.0f} MiB vs {memory['open_clip']:.0f} MiB "
            f"({figures['memory_ratio_vs_open_clip']['ours']:.2f}x)")


def describe_device_decode(figures: dict) -> str:
    return (f"256 px, {figures['workers']} workers: CPU workers {figures['cpu_workers_images_per_second']:.0f} "
            f"images/s, decoded on {figures['device']} {figures['device_decode_images_per_second']:.0f} "
            f"({figures['ratio']:.2f}x); MAE {figures['mae']:.3f} < {figures['max_mae']}")


def describe_loss_memory(figures: dict) -> str:
    return "; ".join(f"{row['loss']} {row['local_batch']}: {row['ours_peak_mib']:.0f} vs "
                     f"{row['open_clip_peak_mib']:.0f} MiB ({row['memory_ratio']:.2f}x), "
                     f"{row['ours_time_s'] * 1e3:.0f} vs {row['open_clip_time_s'] * 1e3:.0f} ms"
                     for row in figures["rows"])


@dataclass(frozen=True)
class Part:
    name: str
    command: Callable[[Context], list[str]]  # built when the part starts, from what earlier parts wrote
    read_figures: Callable[[Context], dict]  # raises CheckFailed
    describe: Callable[[dict], str]  # one line for the summary
    limit_seconds: float
    needs: tuple[str, ...] = ()  # parts that must have passed first


PARTS = (
    Part("demo_data", demo_data_command, read_demo_data, describe_demo_data, 180),
    Part("demo_train", demo_train_command, read_demo_train, describe_demo_train, 240, ("demo_data",)),
    Part("demo_zeroshot", demo_zeroshot_command, read_demo_zeroshot, describe_demo_zeroshot, 90, ("demo_train",)),
    Part("train_step", train_step_command, read_train_step, describe_train_step, 240),
    Part("loss_memory", loss_memory_command, read_loss_memory, describe_loss_memory, 180),
    Part("device_decode", device_decode_command, read_device_decode, describe_device_decode, 150),
)


def summary_line(name: str, result: dict) -> str:
    """One line for a part's result (gpu_check.PartResult as a dict)."""
    head = f"  {name:<14} {result['status']:<9} {result['seconds']:5.0f} s  "
    if result["status"] != "passed":
        return head + result["reason"] + (f" (log: {result['log']})" if result["log"] else "")
    describe = next(part.describe for part in PARTS if part.name == name)
    return head + describe(result["figures"])
