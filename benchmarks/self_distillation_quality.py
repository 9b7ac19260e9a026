"""SigLIP 2's late self-distillation against the plain sigmoid loss at equal steps: dense-probe mIoU, grounding-probe
accuracy and zero-shot.

    python benchmarks/self_distillation_quality.py --json benchmarks/results/self_distillation_quality.json
    python benchmarks/self_distillation_quality.py --smoke --json /tmp/self_distillation_smoke.json   # what CI runs

Two arms per seed, trained from the same seed on the same batches for the same steps, one after another in this
process: `sigmoid` (experiment=demo_siglip: the tiny SigLIP, loss=siglip) and `siglip2` (the same with
loss=siglip2: from loss.self_distillation.start of the steps on, the local-to-global and masked-prediction terms
against an EMA teacher, with the global and local views of experiment=demo_siglip2). Both train on the first
--train-samples Fashion-MNIST images at 28 px, one process. Each final checkpoint is scored by
- the dense probe (contrastive-eval dense): a linear probe on the last block's patch tokens, fitted on the train
  canvases of a grounding set (contrastive.data.grounding, --canvas-size px, fed at --dense-image-size px so the
  tower, whose position embeddings resample, sees a finer patch grid), scored by mIoU and pixel accuracy on its test
  canvases;
- the grounding probe (contrastive-eval grounding, called as that command calls it: the encoder's own image size,
  --probe-steps steps, probe seed 0): a box-regression probe on the frozen patch tokens, fitted on the same train
  canvases, scored by the share of test (canvas, phrase) pairs whose box reaches IoU >= 0.5;
- zero-shot classification on the first --test-samples Fashion-MNIST test images.

The JSON holds every run, mean and sample standard deviation per arm, per metric the difference of the means and
whether it exceeds twice the larger standard deviation (only such a difference counts), the load average, the git
commit and the command.
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

from benchmarks.provenance import git_commit  # noqa: E402
from contrastive.config import register_configs  # noqa: E402
from contrastive.data.demo import build_demo_dataset  # noqa: E402
from contrastive.data.grounding import build_grounding_dataset  # noqa: E402
from contrastive.dist import shutdown_distributed  # noqa: E402
from contrastive.encoders import load_encoder  # noqa: E402
from contrastive.eval.dense import DenseProbeEvaluation  # noqa: E402
from contrastive.eval.evaluators import build_evaluators  # noqa: E402
from contrastive.eval.grounding import ProbeSettings, evaluate_grounding  # noqa: E402
from contrastive.eval.linear_probe import WEIGHT_DECAYS  # noqa: E402
from contrastive.train.trainer import Trainer  # noqa: E402

ARMS = ("sigmoid", "siglip2")
METRICS = ("dense_miou", "dense_pixel_acc", "grounding_acc_iou50", "zeroshot_acc1")
SMOKE_WEIGHT_DECAYS = (1e-3,)  # one probe fit instead of a search: the smoke run checks mechanisms, not scores
SMOKE_PROBE_STEPS = 5  # grounding-probe steps at smoke size, for the same reason


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "self_distillation_quality")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--start", type=float, default=0.8, help="loss.self_distillation.start (SigLIP 2: 0.8)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-samples", type=int, default=20000, help="first N Fashion-MNIST train images")
    parser.add_argument("--test-samples", type=int, default=2000, help="first N Fashion-MNIST test images")
    parser.add_argument("--train-canvases", type=int, default=300)
    parser.add_argument("--test-canvases", type=int, default=150)
    parser.add_argument("--canvas-size", type=int, default=56)
    parser.add_argument("--dense-image-size", type=int, default=56, help="a multiple of the 7 px patch")
    parser.add_argument("--probe-steps", type=int, default=ProbeSettings.steps,
                        help="grounding-probe steps (contrastive-eval grounding --probe-steps)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (trainer.threads_per_process); on a shared CPU one is fastest")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (CI): 1 seed x 3 steps, the switch at step 1, 64 samples, 16 canvases, "
                             "one probe weight decay, 5 grounding-probe steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.start, args.batch_size = 1, 3, 0.34, 8
        args.train_samples, args.test_samples, args.train_canvases, args.test_canvases = 64, 64, 16, 8
        args.canvas_size = args.dense_image_size = 28
        args.probe_steps = SMOKE_PROBE_STEPS
    return args


def run_overrides(args: argparse.Namespace, data_root: Path, eval_root: Path, arm: str, seed: int) -> list[str]:
    overrides = [
        "experiment=demo_siglip" if arm == "sigmoid" else "experiment=demo_siglip2",
        f"name=self_distillation_{arm}_{seed}", f"run_dir={args.work_dir / 'runs' / f'{arm}_seed{seed}'}",
        f"seed={seed}", "dist.strategy=ddp",  # one process: no wrapper either way
        f"trainer.threads_per_process={args.threads}",
        f"data.sources.0.shards={data_root / 'train'}", f"data.batch_size={args.batch_size}",
        f"trainer.max_steps={args.steps}", f"trainer.checkpoint_every={args.steps}",
        f"trainer.log_every={1 if args.smoke else 10}", f"optim.warmup_steps={max(1, args.steps // 10)}",
        "trainer.progress_bar=false", "logger.wandb.mode=disabled", f"data.num_workers={0 if args.smoke else 1}",
        f"data.shuffle_buffer={64 if args.smoke else 5000}", f"eval.zeroshot.0.root={eval_root}",
    ]
    if arm == "siglip2":
        overrides.append(f"loss.self_distillation.start={args.start}")
    return overrides


def train_one(args: argparse.Namespace, roots: dict[str, Path], grounding_root: Path, dense: DenseProbeEvaluation,
              arm: str, seed: int) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=run_overrides(args, roots["train"], roots["test"], arm, seed))
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # every run starts afresh, whatever an earlier one left
    started = time.perf_counter()
    trainer = Trainer(cfg, evaluators=build_evaluators(cfg.eval))
    result = trainer.train()
    seconds = time.perf_counter() - started
    trainer.loader = None  # stops its data-loader worker
    shutdown_distributed()
    encoder = load_encoder(cfg.run_dir)
    dense_metrics = dense.run(encoder, torch.device("cpu"))  # at the trainer's thread count
    grounding_metrics = evaluate_grounding(encoder, grounding_root, torch.device("cpu"),
                                           ProbeSettings(steps=args.probe_steps, seed=0))
    return {
        "arm": arm, "seed": seed,
        "dense_miou": dense_metrics["miou"], "dense_pixel_acc": dense_metrics["pixel_acc"],
        "dense_patch_acc": dense_metrics["patch_acc"], "dense_weight_decay": dense_metrics["weight_decay"],
        "grounding_acc_iou50": grounding_metrics["probe_acc_iou50"],
        "grounding_mean_iou": grounding_metrics["probe_mean_iou"],
        "zeroshot_acc1": result.eval_metrics["eval/fashion-mnist/acc1"],
        "final_loss": result.final_loss, "train_seconds": seconds,
    }


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for arm in ARMS:
        mine = [run for run in runs if run["arm"] == arm]
        summary[arm] = {"seeds": len(mine), "train_seconds_mean": statistics.mean(r["train_seconds"] for r in mine)}
        for metric in METRICS:
            values = [run[metric] for run in mine]
            summary[arm][f"{metric}_mean"] = statistics.mean(values)
            summary[arm][f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    for metric in METRICS:
        difference = summary["siglip2"][f"{metric}_mean"] - summary["sigmoid"][f"{metric}_mean"]
        sigma = max(summary[arm][f"{metric}_std"] for arm in ARMS)
        summary[f"{metric}_siglip2_minus_sigmoid"] = difference
        # Counted only beyond twice the larger per-arm standard deviation (never with a single seed).
        summary[f"{metric}_difference_counts"] = sigma > 0 and abs(difference) > 2 * sigma
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commit = git_commit()  # the code that runs, before any later checkout changes it
    load_before = os.getloadavg()
    logging.basicConfig(level=logging.WARNING)
    register_configs()
    roots = {split: build_demo_dataset(args.work_dir / f"fashion-mnist-{split}-{samples}",
                                       samples_per_shard=max(2, samples // 4), limit=samples).root
             for split, samples in (("train", args.train_samples), ("test", args.test_samples))}
    grounding = build_grounding_dataset(args.work_dir / f"grounding-{args.canvas_size}px-{args.train_canvases}",
                                        train_canvases=args.train_canvases, test_canvases=args.test_canvases,
                                        canvas_size=args.canvas_size)
    dense = DenseProbeEvaluation("grounding", grounding, image_size=args.dense_image_size,
                                 weight_decays=SMOKE_WEIGHT_DECAYS if args.smoke else WEIGHT_DECAYS)
    runs = []
    for seed in range(args.seeds):
        for arm in ARMS:
            runs.append(train_one(args, roots, grounding, dense, arm, seed))
            run = runs[-1]
            print(f"seed {seed} {arm:7s}: dense mIoU {run['dense_miou']:.4f}, pixel acc {run['dense_pixel_acc']:.4f}, "
                  f"grounding acc@IoU0.5 {run['grounding_acc_iou50']:.4f}, zero-shot acc1 {run['zeroshot_acc1']:.4f}, "
                  f"{run['train_seconds']:.0f} s", flush=True)
    summary = summarise(runs)
    for arm in ARMS:
        print(f"{arm:7s}: " + ", ".join(f"{metric} {summary[arm][f'{metric}_mean']:.4f} +- "
                                        f"{summary[arm][f'{metric}_std']:.4f}" for metric in METRICS)
              + f" over {summary[arm]['seeds']} seeds")
    for metric in METRICS:
        print(f"siglip2 - sigmoid {metric}: {summary[f'{metric}_siglip2_minus_sigmoid']:+.4f} "
              f"({'beyond' if summary[f'{metric}_difference_counts'] else 'within'} 2 sigma)")
    report = {
        "benchmark": "self_distillation_quality", "commit": commit,
        "command": " ".join(["python", f"benchmarks/{Path(__file__).name}",
                             *(sys.argv[1:] if argv is None else argv)]),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "runs": runs, "summary": summary,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
