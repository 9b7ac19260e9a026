"""Staged training (trainer.stages) against a fixed-size run at equal steps: zero-shot accuracy and total FLOPs.

    python benchmarks/stages_quality.py --json benchmarks/results/stages_quality.json   # the full run (2-core CPU)
    python benchmarks/stages_quality.py --smoke --json /tmp/stages_smoke.json             # what CI runs

The 28 px demo has only 16 patches, so this benchmark builds an upsampled variant of it (Fashion-MNIST at
--image-size px, bicubic; `contrastive-data demo --image-size`) and trains the demo's tiny CLIP (its image tower
cut to --vision-width and --vision-layers, so that 3 seeds x 2 arms fit a shared 2-core CPU) on patches of
--patch-size (112 px / 14 = 64 patches). Each seed trains two arms from the same seed, for the same steps and
batches: `fixed` at the full size throughout, and `staged` at --stage-image-size px and --stage-context-length
tokens for the first --stage-until of the steps, then at full size (CLIPA's and Perception Encoder's recipe).
Both are scored zero-shot at full size on the first --test-samples held-out test images. Total FLOPs are model FLOPs
(forward + backward, contrastive.train.flops) per sample of each stage, counted by the trainer at that stage's
sizes, times the samples trained in it. Training runs in this process, one run after another.

The JSON holds every run, the mean and sample standard deviation per arm, the git commit and the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.provenance import git_commit  # noqa: E402
from contrastive.config import register_configs  # noqa: E402
from contrastive.data.demo import build_demo_dataset  # noqa: E402
from contrastive.dist import shutdown_distributed  # noqa: E402
from contrastive.eval.evaluators import build_evaluators  # noqa: E402
from contrastive.train.trainer import Trainer  # noqa: E402

ARMS = ("fixed", "staged")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "stages_quality")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-samples", type=int, default=30000, help="first N Fashion-MNIST train images")
    parser.add_argument("--test-samples", type=int, default=2000, help="first N Fashion-MNIST test images")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--stage-until", type=float, default=0.6)
    parser.add_argument("--stage-image-size", type=int, default=56)
    parser.add_argument("--stage-context-length", type=int, default=12)
    parser.add_argument("--model", default="tiny_clip", help="a conf/model/ file")
    parser.add_argument("--vision-width", type=int, default=64)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (CI): 1 seed x 4 steps of the test model on 28 px, 256 samples")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.batch_size, args.train_samples, args.test_samples = 1, 4, 32, 256, 256
        args.image_size, args.patch_size, args.stage_image_size, args.model = 28, 7, 14, "test_tiny"
        args.vision_width, args.vision_layers = 32, 1
    return args


def run_overrides(args: argparse.Namespace, data_root: Path, eval_root: Path, arm: str, seed: int) -> list[str]:
    overrides = [
        "experiment=demo", f"model={args.model}", f"name=stages_{arm}_{seed}",
        f"run_dir={args.work_dir / 'runs' / f'{arm}_seed{seed}'}", f"seed={seed}",
        f"model.vision.image_size={args.image_size}", f"model.vision.patch_size={args.patch_size}",
        f"model.vision.width={args.vision_width}", f"model.vision.layers={args.vision_layers}",
        f"data.sources.0.shards={data_root / 'train'}", f"data.batch_size={args.batch_size}",
        f"trainer.max_steps={args.steps}", f"trainer.checkpoint_every={args.steps}",
        f"trainer.log_every={1 if args.smoke else 10}", f"optim.warmup_steps={max(1, args.steps // 10)}",
        "trainer.progress_bar=false", "logger.wandb.mode=disabled", f"data.num_workers={0 if args.smoke else 1}",
        f"data.shuffle_buffer={64 if args.smoke else 5000}",
        f"eval.zeroshot.0.root={eval_root}",
    ]
    if arm == "staged":
        overrides.append(f"trainer.stages=[{{until: {args.stage_until}, image_size: {args.stage_image_size}, "
                         f"context_length: {args.stage_context_length}}}]")
    return overrides


def train_one(args: argparse.Namespace, data_root: Path, eval_root: Path, arm: str, seed: int) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=run_overrides(args, data_root, eval_root, arm, seed))
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # every run starts afresh, whatever an earlier one left
    started = time.perf_counter()
    trainer = Trainer(cfg, evaluators=build_evaluators(cfg.eval))
    result = trainer.train()
    seconds = time.perf_counter() - started
    flops = {stage.index: trainer.flops_per_sample[stage.index] * (stage.end_step - stage.first_step)
             * args.batch_size for stage in trainer.stages}
    trainer.loader = None  # stops its data-loader worker
    shutdown_distributed()
    return {
        "arm": arm, "seed": seed,
        "zeroshot_acc1": result.eval_metrics["eval/fashion-mnist/acc1"],
        "zeroshot_acc5": result.eval_metrics["eval/fashion-mnist/acc5"],
        "final_loss": result.final_loss, "total_flops": sum(flops.values()),
        "stages": [{"steps": [s.first_step, s.end_step], "image_size": s.image_size,
                    "context_length": s.context_length, "flops_per_sample": trainer.flops_per_sample[s.index]}
                   for s in trainer.stages],
        "seconds": seconds,
    }


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for arm in ARMS:
        mine = [run for run in runs if run["arm"] == arm]
        acc1 = [run["zeroshot_acc1"] for run in mine]
        summary[arm] = {
            "zeroshot_acc1_mean": statistics.mean(acc1),
            "zeroshot_acc1_std": statistics.stdev(acc1) if len(acc1) > 1 else 0.0,
            "total_flops": statistics.mean(run["total_flops"] for run in mine),
            "seconds_mean": statistics.mean(run["seconds"] for run in mine),
            "seeds": len(mine),
        }
    summary["staged_flops_over_fixed"] = summary["staged"]["total_flops"] / summary["fixed"]["total_flops"]
    summary["staged_seconds_over_fixed"] = summary["staged"]["seconds_mean"] / summary["fixed"]["seconds_mean"]
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commit = git_commit()  # the code that runs, before any later checkout changes it
    logging.basicConfig(level=logging.WARNING)
    register_configs()
    def demo_dataset(samples: int) -> Path:  # the first `samples` images of each split, upsampled
        return build_demo_dataset(args.work_dir / f"fashion-mnist-{args.image_size}px-{samples}",
                                  samples_per_shard=max(2, samples // 4), limit=samples,
                                  image_size=args.image_size).root

    data_root, eval_root = demo_dataset(args.train_samples), demo_dataset(args.test_samples)
    runs = []
    for seed in range(args.seeds):
        for arm in ARMS:
            runs.append(train_one(args, data_root, eval_root, arm, seed))
            run = runs[-1]
            print(f"seed {seed} {arm:6s}: zero-shot acc1 {run['zeroshot_acc1']:.4f}, "
                  f"{run['total_flops']:.3e} FLOPs, {run['seconds']:.0f} s", flush=True)
    summary = summarise(runs)
    for arm in ARMS:
        print(f"{arm:6s}: acc1 {summary[arm]['zeroshot_acc1_mean']:.4f} +- {summary[arm]['zeroshot_acc1_std']:.4f} "
              f"over {summary[arm]['seeds']} seeds, {summary[arm]['total_flops']:.3e} FLOPs")
    print(f"staged / fixed: {summary['staged_flops_over_fixed']:.3f}x the FLOPs, "
          f"{summary['staged_seconds_over_fixed']:.3f}x the time")
    report = {
        "benchmark": "stages_quality", "commit": commit,
        "command": " ".join(["python", f"benchmarks/{Path(__file__).name}",
                             *(sys.argv[1:] if argv is None else argv)]),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "runs": runs, "summary": summary,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
