"""Distillation against training from scratch at equal student steps: zero-shot accuracy, and the step time of
training from a reinforced data set against from-scratch training.

    python benchmarks/distill_quality.py --json benchmarks/results/distill_quality.json   # the full run (2-core CPU)
    python benchmarks/distill_quality.py --smoke --json /tmp/distill_smoke.json             # what CI runs

The teacher is the demo CLIP (experiment=demo, conf/model/tiny_clip.yaml) trained for --teacher-steps steps on the
first --train-samples Fashion-MNIST train images. The student is conf/model/tiny_clip_half.yaml (the same depth at
half the width). The teacher's set is then reinforced (`contrastive-data reinforce`, --augmentations stored crops
per image at data.crop_scale). Three arms, each for --steps student steps from the same seed, over --seeds seeds:
`scratch` (the CLIP loss alone), `online` (experiment=demo_distill: the teacher runs on each batch) and
`reinforced` (experiment=demo_distill_reinforced: the stored embeddings, no teacher forward). Every arm uses the
same random crops (data.crop_scale=--crop-scale). All are scored zero-shot on the first --test-samples test images.

Step time: each run's mean seconds per step over its log windows after the first (the trainer's samples_per_second;
the first window holds start-up), reported per arm and as ratios against `scratch` measured in the same session.
Training runs in this process, one run after another; the load average is recorded, as the machine is shared.

The JSON holds every run, the mean and sample standard deviation per arm, the git commit and the command. A gain
counts only beyond 2 standard deviations (`*_minus_scratch_in_std`, against the larger of the two arms' std).
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

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.provenance import git_commit  # noqa: E402
from contrastive.cli.data import main as data_main  # noqa: E402
from contrastive.config import register_configs  # noqa: E402
from contrastive.data.demo import build_demo_dataset  # noqa: E402
from contrastive.dist import shutdown_distributed  # noqa: E402
from contrastive.eval.evaluators import build_evaluators  # noqa: E402
from contrastive.train.trainer import Trainer  # noqa: E402

ARMS = ("scratch", "online", "reinforced")
EXPERIMENTS = {"teacher": "demo", "scratch": "demo", "online": "demo_distill", "reinforced": "demo_distill_reinforced"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "distill_quality")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--teacher-batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=150, help="student steps, the same in every arm")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-samples", type=int, default=12000, help="first N Fashion-MNIST train images")
    parser.add_argument("--test-samples", type=int, default=2000, help="first N Fashion-MNIST test images")
    parser.add_argument("--augmentations", type=int, default=4, help="stored crops per image in the reinforced set")
    parser.add_argument("--crop-scale", type=float, nargs=2, default=[0.7, 1.0])
    parser.add_argument("--teacher-model", default="tiny_clip")
    parser.add_argument("--student-model", default="tiny_clip_half")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (CI): 1 seed x 3 steps of test_tiny students of a 3-step test_tiny teacher")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.teacher_steps, args.steps, args.batch_size, args.teacher_batch_size = 1, 3, 3, 32, 32
        args.train_samples, args.test_samples, args.augmentations = 128, 128, 2
        args.teacher_model = args.student_model = "test_tiny"
    return args


def run_overrides(args: argparse.Namespace, roots: dict[str, Path], arm: str, seed: int) -> list[str]:
    teacher = arm == "teacher"
    steps, batch = (args.teacher_steps, args.teacher_batch_size) if teacher else (args.steps, args.batch_size)
    shards = roots["reinforced"] if arm == "reinforced" else roots["train"] / "train"
    overrides = [
        f"experiment={EXPERIMENTS[arm]}", f"model={args.teacher_model if teacher else args.student_model}",
        f"name=distill_{arm}_{seed}", f"run_dir={run_dir(args, arm, seed)}", f"seed={seed}",
        f"data.sources.0.shards={shards}", f"data.batch_size={batch}", "data.resampled=true",
        f"data.crop_scale=[{args.crop_scale[0]},{args.crop_scale[1]}]",
        f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps}",
        f"trainer.log_every={1 if args.smoke else 10}", f"optim.warmup_steps={max(1, steps // 10)}",
        "trainer.progress_bar=false", "logger.wandb.mode=disabled", f"data.num_workers={0 if args.smoke else 1}",
        f"data.shuffle_buffer={64 if args.smoke else 5000}", f"eval.zeroshot.0.root={roots['test']}",
    ]
    if arm in ("online", "reinforced"):
        overrides.append(f"loss.distillation.teachers.0.path={run_dir(args, 'teacher', 0)}")
    return overrides


def run_dir(args: argparse.Namespace, arm: str, seed: int) -> Path:
    return args.work_dir / "runs" / f"{arm}_seed{seed}"


def seconds_per_step(path: Path, batch_size: int) -> float:
    """Mean seconds per step over the log windows after the first (start-up and the first batches)."""
    rates = [row["samples_per_second"] for row in map(json.loads, path.read_text().splitlines())
             if "samples_per_second" in row]
    steady = rates[1:] or rates
    return statistics.mean(batch_size / rate for rate in steady)


def train_one(args: argparse.Namespace, roots: dict[str, Path], arm: str, seed: int) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=run_overrides(args, roots, arm, seed))
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # every run starts afresh, whatever an earlier one left
    started = time.perf_counter()
    trainer = Trainer(cfg, evaluators=build_evaluators(cfg.eval))
    result = trainer.train()
    seconds = time.perf_counter() - started
    trainer.loader = None  # stops its data-loader worker
    shutdown_distributed()
    return {
        "arm": arm, "seed": seed,
        "zeroshot_acc1": result.eval_metrics["eval/fashion-mnist/acc1"],
        "zeroshot_acc5": result.eval_metrics["eval/fashion-mnist/acc5"],
        "final_loss": result.final_loss, "seconds": seconds,
        "seconds_per_step": seconds_per_step(Path(cfg.run_dir) / "metrics.jsonl", cfg.data.batch_size),
    }


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for arm in ARMS:
        mine = [run for run in runs if run["arm"] == arm]
        acc1 = [run["zeroshot_acc1"] for run in mine]
        summary[arm] = {
            "zeroshot_acc1_mean": statistics.mean(acc1),
            "zeroshot_acc1_std": statistics.stdev(acc1) if len(acc1) > 1 else 0.0,
            "seconds_per_step_mean": statistics.mean(run["seconds_per_step"] for run in mine),
            "seeds": len(mine),
        }
    scratch = summary["scratch"]
    for arm in ("online", "reinforced"):
        spread = max(summary[arm]["zeroshot_acc1_std"], scratch["zeroshot_acc1_std"])
        gain = summary[arm]["zeroshot_acc1_mean"] - scratch["zeroshot_acc1_mean"]
        summary[f"{arm}_minus_scratch_acc1"] = gain
        summary[f"{arm}_minus_scratch_in_std"] = gain / spread if spread > 0 else None
        summary[f"{arm}_step_time_over_scratch"] = (summary[arm]["seconds_per_step_mean"]
                                                    / scratch["seconds_per_step_mean"])
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commit = git_commit()  # the code that runs, before any later checkout changes it
    load_before = os.getloadavg()
    logging.basicConfig(level=logging.WARNING)
    register_configs()
    roots = {split: build_demo_dataset(args.work_dir / f"fashion-mnist-{samples}", limit=samples,
                                       samples_per_shard=max(2, samples // 8)).root
             for split, samples in (("train", args.train_samples), ("test", args.test_samples))}
    started = time.perf_counter()
    teacher = train_one(args, roots, "teacher", 0)
    print(f"teacher ({args.teacher_steps} steps): zero-shot acc1 {teacher['zeroshot_acc1']:.4f}, "
          f"{teacher['seconds']:.0f} s", flush=True)
    roots["reinforced"] = args.work_dir / "reinforced"
    shutil.rmtree(roots["reinforced"], ignore_errors=True)
    reinforce_started = time.perf_counter()
    assert data_main(["reinforce", str(roots["train"] / "train"), "--teacher", f"demo={run_dir(args, 'teacher', 0)}",
                      "--out", str(roots["reinforced"]), "--augmentations", str(args.augmentations),
                      "--crop-scale", *map(str, args.crop_scale), "--device", "cpu"]) == 0
    reinforce_seconds = time.perf_counter() - reinforce_started
    manifest = json.loads((roots["reinforced"] / "reinforce.json").read_text())
    runs = []
    for seed in range(args.seeds):
        for arm in ARMS:
            runs.append(train_one(args, roots, arm, seed))
            run = runs[-1]
            print(f"seed {seed} {arm:10s}: zero-shot acc1 {run['zeroshot_acc1']:.4f}, "
                  f"{run['seconds_per_step']:.3f} s/step, {run['seconds']:.0f} s", flush=True)
    summary = summarise(runs)
    for arm in ARMS:
        print(f"{arm:10s}: acc1 {summary[arm]['zeroshot_acc1_mean']:.4f} +- {summary[arm]['zeroshot_acc1_std']:.4f} "
              f"over {summary[arm]['seeds']} seeds, {summary[arm]['seconds_per_step_mean']:.3f} s/step")
    for arm in ("online", "reinforced"):
        print(f"{arm} / scratch: {summary[f'{arm}_step_time_over_scratch']:.3f}x the step time; acc1 "
              f"{summary[f'{arm}_minus_scratch_acc1']:+.4f}")
    report = {
        "benchmark": "distill_quality", "commit": commit,
        "command": " ".join(["python", f"benchmarks/{Path(__file__).name}",
                             *(sys.argv[1:] if argv is None else argv)]),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "total_seconds": time.perf_counter() - started,
        "teacher": teacher, "reinforced_set": {key: manifest[key] for key in
                                               ("input_bytes", "output_bytes", "size_overhead", "augmentations")},
        "reinforce_seconds": reinforce_seconds,
        "runs": runs, "summary": summary,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
