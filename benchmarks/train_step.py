"""Throughput of our full training step against open_clip's own, on the same model, batch, loss, precision, threads.

    python benchmarks/train_step.py --json train_step.json
    python benchmarks/train_step.py --models tiny --repeats 20   # quick

Ours: `contrastive.train.accumulation` forward/backward (model -> ModelOutput -> loss=clip), then
`contrastive.train.optim.optimizer_step` (gradient-norm clipping at optim.grad_clip_norm, the non-finite check,
AdamW over our parameter groups, zero_grad) and the schedule: the body of `Trainer.train`'s loop. Theirs: the
body of open_clip_train.train.train_one_epoch with accum_freq=1 and its defaults (no gradient clipping): zero_grad, model(images, texts) -> ClipLoss -> backward, AdamW (its
gain/bias groups), logit-scale clamp, open_clip_train's cosine_lr schedule. Theirs is an open_clip `CLIP` built
from the same tower configs and loaded with our model's weights.

Each contender runs in a process of its own, as a training run would (at most --concurrent at once; the variants
take turns beside ours and open_clip): the processes take one step each per round,
in a rotating order, so machine noise hits all of them alike, and no contender's memory state affects another's.
A step's time depends on where its process's memory happens to land, so every contender is started in
--processes fresh processes; figures are medians over all timed steps, after warm-up rounds. Ours is timed with
its defaults (fused AdamW; freed host memory reused, `contrastive.train.host_memory`) and with other settings:
channels-last images and weights, AdamW's foreach or per-tensor loop (open_clip's default on CPU), host memory
returned to the kernel as glibc does by default, torch.compile of the model.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Callable

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip_train.scheduler import cosine_lr
from omegaconf import OmegaConf

from contrastive.config import LossConfig, ModelConfig, OptimConfig
from contrastive.dist.collectives import LocalCollectives
from contrastive.losses import build_loss
from contrastive.models import build_model
from contrastive.models.registry import tower_configs
from contrastive.train.accumulation import build_forward_backward
from contrastive.train.host_memory import reuse_freed_host_memory
from contrastive.train.optim import build_optimizer, build_scheduler, optimizer_step
from contrastive.types import Batch

MODELS = {"tiny": ("conf/model/tiny_clip.yaml", 128), "vit_b_32": ("conf/model/vit_b_32.yaml", 32)}
VARIANTS = ("channels_last", "foreach", "for_loop", "glibc_memory", "compile")
TARGET = 1.0
STEPS = 1000  # schedule length; only the lr value changes with it


def model_config(path: str) -> ModelConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))


def random_batch(model_cfg: ModelConfig, batch_size: int) -> Batch:
    _, vision, text = tower_configs(model_cfg)
    size, length = vision.get("image_size", 224), text.get("context_length", 77)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, text.get("vocab_size", 49408), (batch_size, length), generator=generator)
    tokens[:, length // 2:] = 0
    return Batch(images=torch.randn(batch_size, 3, size, size, generator=generator), tokens=tokens)


def autocast(precision: str):
    return lambda: torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def ours(model_cfg: ModelConfig, batch: Batch, precision: str, variant: str | None) -> Callable[[], None]:
    if variant != "glibc_memory":
        reuse_freed_host_memory()  # as Trainer does on CPU
    torch.manual_seed(0)
    model = build_model(model_cfg)
    optim_cfg = OptimConfig()  # conf/optim/adamw.yaml's values are the schema defaults
    if variant in ("foreach", "for_loop"):
        optim_cfg.implementation = variant
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        batch = Batch(images=batch.images.contiguous(memory_format=torch.channels_last), tokens=batch.tokens)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, STEPS)
    forward_model = torch.compile(model) if variant == "compile" else model
    forward_backward = build_forward_backward(forward_model, build_loss(LossConfig(name="clip")), "clip",
                                              LocalCollectives(), 1, autocast(precision))

    def step() -> None:
        forward_backward(batch)
        optimizer_step(model.parameters(), optimizer, optim_cfg.grad_clip_norm)
        scheduler.step()

    return step


def open_clip_step(model_cfg: ModelConfig, batch: Batch, precision: str, weights: dict) -> Callable[[], None]:
    embed_dim, vision, text = tower_configs(model_cfg)
    model = open_clip.CLIP(embed_dim, CLIPVisionCfg(**vision), CLIPTextCfg(**text), quick_gelu=model_cfg.quick_gelu,
                           output_dict=True)
    model.load_state_dict(weights)
    model.train()
    # open_clip_train.main's parameter groups and AdamW arguments
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    defaults = OptimConfig()
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": defaults.weight_decay}],
        lr=defaults.lr, betas=tuple(defaults.betas), eps=defaults.eps,
    )
    scheduler = cosine_lr(optimizer, defaults.lr, defaults.warmup_steps, STEPS)
    loss = open_clip.ClipLoss()
    amp = autocast(precision)
    counter = iter(range(10**9))

    def step() -> None:
        scheduler(next(counter))
        optimizer.zero_grad()
        with amp():
            losses = loss(**model(batch.images, batch.tokens), output_dict=True)
            total_loss = sum(losses.values())
        total_loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def build_contender(name: str, model_name: str, batch_size: int, precision: str) -> Callable[[], None]:
    path, default_batch = MODELS[model_name]
    model_cfg = model_config(path)
    batch = random_batch(model_cfg, batch_size or default_batch)
    if name == "open_clip":
        torch.manual_seed(0)
        return open_clip_step(model_cfg, batch, precision, build_model(model_cfg).clip.state_dict())
    return ours(model_cfg, batch, precision, name.removeprefix("ours_") if name != "ours" else None)


def serve(args) -> None:
    """Child process: build one contender, then time one step per line read from stdin."""
    torch.set_num_threads(args.threads)
    step = build_contender(args.serve, args.model, args.batch_size, args.precision)
    print("ready", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        step()
        print(time.perf_counter() - start, flush=True)


def start(contender: str, model_name: str, args) -> subprocess.Popen:
    command = [sys.executable, __file__, "--serve", contender, "--model", model_name, "--batch-size",
               str(args.batch_size), "--precision", args.precision, "--threads", str(args.threads)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{contender} did not start: exit code {process.wait()}")
    return process


def timed_step(process: subprocess.Popen) -> float:
    process.stdin.write("step\n")
    process.stdin.flush()
    return float(process.stdout.readline())


def measure(contenders: list[str], model_name: str, args) -> dict[str, list[float]]:
    """Per contender, the timed steps of all its processes; the contenders' processes step in turn."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.processes):
        processes = {name: start(name, model_name, args) for name in contenders}
        try:
            for round_index in range(args.warmup + args.repeats):
                shift = round_index % len(contenders)
                for name in contenders[shift:] + contenders[:shift]:
                    elapsed = timed_step(processes[name])
                    if round_index >= args.warmup:
                        times[name].append(elapsed)
        finally:
            for process in processes.values():
                process.stdin.close()
                process.wait()
    return times


def benchmark(name: str, args) -> dict:
    """Variants run in groups beside ours and open_clip, so at most --concurrent processes hold a model at once."""
    batch_size = args.batch_size or MODELS[name][1]
    variants = [f"ours_{variant}" for variant in args.variants if variant]
    per_group = max(1, args.concurrent - 2)
    groups = [variants[index:index + per_group] for index in range(0, len(variants), per_group)] or [[]]
    times: dict[str, list[float]] = {}
    for group in groups:
        for contender, values in measure(["ours", "open_clip", *group], name, args).items():
            times.setdefault(contender, []).extend(values)
    medians = {contender: statistics.median(values) for contender, values in times.items()}
    samples_per_second = {contender: batch_size / seconds for contender, seconds in medians.items()}
    reference = samples_per_second["open_clip"]
    return {
        "model": name, "batch_size": batch_size, "precision": args.precision, "threads": args.threads,
        "processes": args.processes, "repeats": args.repeats,
        "median_step_seconds": medians,
        "samples_per_second": samples_per_second,
        "throughput_ratio_vs_open_clip": {c: s / reference for c, s in samples_per_second.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,vit_b_32", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batch-size", type=int, default=0, help="0: tiny 128, vit_b_32 32")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"ours with other settings: {VARIANTS}")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrent", type=int, default=4,
                        help="processes alive at once (memory): variants run in groups beside ours and open_clip")
    parser.add_argument("--processes", type=int, default=2, help="fresh processes per contender, one after another")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per process (one step per contender)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compile happens here)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run one contender in this process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args)
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS) - {""}
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    results = [benchmark(name, args) for name in args.models.split(",")]
    for result in results:
        print(f"\n{result['model']}, batch {result['batch_size']}, {result['precision']}, {result['threads']} threads, "
              f"median of {result['processes']} processes x {result['repeats']} interleaved steps")
        print(f"{'contender':<20} {'s/step':>8} {'samples/s':>10} {'vs open_clip':>13}")
        for contender, seconds in result["median_step_seconds"].items():
            print(f"{contender:<20} {seconds:8.4f} {result['samples_per_second'][contender]:10.1f} "
                  f"{result['throughput_ratio_vs_open_clip'][contender]:12.3f}x")
        ratio = result["throughput_ratio_vs_open_clip"]["ours"]
        print(f"ours (defaults) / open_clip = {ratio:.3f}x (target >= {TARGET}x): {'met' if ratio >= TARGET else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"target_ratio": TARGET, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
