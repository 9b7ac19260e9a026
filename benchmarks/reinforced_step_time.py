"""Step time of training from a reinforced data set against from-scratch training, like for like in one run.

    python benchmarks/reinforced_step_time.py --json benchmarks/results/reinforced_step_time.json
    python benchmarks/reinforced_step_time.py --smoke --json /tmp/reinforced_step_time_smoke.json   # what CI runs

Both arms train the same student (--student-model) from the same seed at the same batch size with the same data
workers and crop scale: `scratch` (experiment=demo: the CLIP loss alone, the plain shards) and `reinforced`
(experiment=demo_distill_reinforced: the CLIP loss plus the distillation terms against the stored teacher
embeddings, the reinforced shards). The teacher (--teacher-model, trained --teacher-steps steps: its quality does not
matter here) is run once by `contrastive-data reinforce` before the rounds. The arms alternate for --rounds rounds, so
a change in the shared machine's load falls on both.

Per arm and round: the seconds of each training step after the first --warmup-steps (the trainer's
samples_per_second with trainer.log_every=1), the seconds per batch of the data loader alone (the same loader,
no model step), and the seconds of the model step alone (forward, backward and optimiser step on one of the
loader's batches, no loader): where the step's time goes. Reported: medians over every round's steps, and the
reinforced / scratch ratios. The JSON holds the commit, the command and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.distill_quality import git_commit, run_dir, run_overrides  # noqa: E402
from contrastive.cli.data import main as data_main  # noqa: E402
from contrastive.config import register_configs  # noqa: E402
from contrastive.data.demo import build_demo_dataset  # noqa: E402
from contrastive.dist import shutdown_distributed  # noqa: E402
from contrastive.train.optim import optimizer_step  # noqa: E402
from contrastive.train.trainer import Trainer  # noqa: E402

ARMS = ("scratch", "reinforced")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "reinforced_step_time")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of both arms")
    parser.add_argument("--steps", type=int, default=20, help="training steps per arm and round")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps of each run left out (start-up)")
    parser.add_argument("--data-batches", type=int, default=12, help="loader-only batches per arm and round")
    parser.add_argument("--model-steps", type=int, default=8, help="model-only steps per arm and round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, help="trainer.threads_per_process (default: the trainer's, the "
                                                     "cores the data workers leave)")
    parser.add_argument("--train-samples", type=int, default=1024, help="first N Fashion-MNIST train images")
    parser.add_argument("--augmentations", type=int, default=2, help="stored crops per image in the reinforced set")
    parser.add_argument("--crop-scale", type=float, nargs=2, default=[0.7, 1.0])
    parser.add_argument("--teacher-steps", type=int, default=2)
    parser.add_argument("--teacher-model", default="tiny_clip")
    parser.add_argument("--student-model", default="tiny_clip_half")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI): test_tiny towers, 1 round of 3 steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.warmup_steps, args.data_batches, args.batch_size = 1, 3, 1, 3, 16
        args.model_steps = 2
        args.train_samples, args.num_workers, args.teacher_steps = 64, 0, 1
        args.teacher_model = args.student_model = "test_tiny"
    return args


def compose_run(args: argparse.Namespace, roots: dict[str, Path], arm: str, steps: int, batch_size: int):
    """distill_quality's run for `arm`, with this benchmark's batch, workers and a log line per step, no eval."""
    quality_args = argparse.Namespace(**{**vars(args), "teacher_batch_size": batch_size, "teacher_steps": steps,
                                         "smoke": False})
    overrides = run_overrides(quality_args, roots, arm, 0) + [
        "trainer.log_every=1", f"data.num_workers={args.num_workers}", "data.shuffle_buffer=256",
        "eval.at_end=false", "eval.every_steps=0"] + (
        [] if args.threads is None else [f"trainer.threads_per_process={args.threads}"])
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def step_seconds(args: argparse.Namespace, roots: dict[str, Path], arm: str) -> list[float]:
    """Seconds of each training step after the warm-up steps."""
    cfg = compose_run(args, roots, arm, args.steps, args.batch_size)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    trainer = Trainer(cfg)
    trainer.train()
    trainer.loader = None  # stops its data-loader worker
    shutdown_distributed()
    rates = [row["samples_per_second"] for row in map(json.loads, (Path(cfg.run_dir) / "metrics.jsonl").open())
             if "samples_per_second" in row]
    return [args.batch_size / rate for rate in rates[args.warmup_steps:]]


def loader_and_model_seconds(args: argparse.Namespace, roots: dict[str, Path], arm: str) -> tuple[list, list]:
    """Seconds per batch of the arm's data loader alone, after its first batch (worker start-up); then seconds of
    the model step alone (forward, backward, optimiser step) on one of its batches, after a first one."""
    cfg = compose_run(args, roots, arm, args.steps, args.batch_size)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    trainer = Trainer(cfg)
    batches = iter(trainer.loader)
    next(batches)
    loader = []
    for _ in range(args.data_batches):
        started = time.perf_counter()
        batch = next(batches)
        loader.append(time.perf_counter() - started)
    del batches
    trainer.loader = None
    batch = trainer.normalize.batch(batch)
    model = []
    for _ in range(args.model_steps + 1):
        started = time.perf_counter()
        trainer.forward_backward(batch)
        optimizer_step(trainer.model.parameters(), trainer.optimizer, cfg.optim.grad_clip_norm)
        model.append(time.perf_counter() - started)
    shutdown_distributed()
    return loader, model[1:]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commit = git_commit()
    load_before = os.getloadavg()
    logging.basicConfig(level=logging.WARNING)
    register_configs()
    started = time.perf_counter()
    roots = {"train": build_demo_dataset(args.work_dir / f"fashion-mnist-{args.train_samples}",
                                         limit=args.train_samples,
                                         samples_per_shard=max(2, args.train_samples // 8)).root}
    roots["test"] = roots["train"] / "test"
    teacher_cfg = compose_run(args, roots, "teacher", args.teacher_steps, args.batch_size)
    shutil.rmtree(teacher_cfg.run_dir, ignore_errors=True)
    Trainer(teacher_cfg).train()
    shutdown_distributed()
    roots["reinforced"] = args.work_dir / "reinforced"
    shutil.rmtree(roots["reinforced"], ignore_errors=True)
    assert data_main(["reinforce", str(roots["train"] / "train"), "--teacher", f"demo={run_dir(args, 'teacher', 0)}",
                      "--out", str(roots["reinforced"]), "--augmentations", str(args.augmentations),
                      "--crop-scale", *map(str, args.crop_scale), "--device", "cpu"]) == 0
    steps = {arm: [] for arm in ARMS}
    loads = {arm: [] for arm in ARMS}
    models = {arm: [] for arm in ARMS}
    for round_index in range(args.rounds):
        for arm in ARMS if round_index % 2 == 0 else reversed(ARMS):  # ABBA: neither arm always runs first
            steps[arm].extend(step_seconds(args, roots, arm))
            loader, model = loader_and_model_seconds(args, roots, arm)
            loads[arm].extend(loader)
            models[arm].extend(model)
            print(f"round {round_index} {arm:10s}: step {statistics.median(steps[arm]):.4f} s, "
                  f"loader {statistics.median(loads[arm]):.4f} s/batch, model step "
                  f"{statistics.median(models[arm]):.4f} s (medians so far)", flush=True)
    summary = {arm: {"step_seconds_median": statistics.median(steps[arm]),
                     "loader_seconds_per_batch_median": statistics.median(loads[arm]),
                     "model_step_seconds_median": statistics.median(models[arm]),
                     "steps_measured": len(steps[arm])} for arm in ARMS}
    summary["step_time_reinforced_over_scratch"] = (summary["reinforced"]["step_seconds_median"]
                                                    / summary["scratch"]["step_seconds_median"])
    summary["loader_time_reinforced_over_scratch"] = (summary["reinforced"]["loader_seconds_per_batch_median"]
                                                      / summary["scratch"]["loader_seconds_per_batch_median"])
    summary["model_step_time_reinforced_over_scratch"] = (summary["reinforced"]["model_step_seconds_median"]
                                                          / summary["scratch"]["model_step_seconds_median"])
    print(f"reinforced / scratch: {summary['step_time_reinforced_over_scratch']:.3f}x the step time, "
          f"{summary['loader_time_reinforced_over_scratch']:.3f}x the loader time per batch, "
          f"{summary['model_step_time_reinforced_over_scratch']:.3f}x the model step alone")
    report = {
        "benchmark": "reinforced_step_time", "commit": commit,
        "command": " ".join(["python", f"benchmarks/{Path(__file__).name}",
                             *(sys.argv[1:] if argv is None else argv)]),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "training_threads": torch.get_num_threads(),  # as the last run's trainer set them
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "total_seconds": time.perf_counter() - started,
        "step_seconds": steps, "loader_seconds_per_batch": loads, "model_step_seconds": models,
        "summary": summary,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
