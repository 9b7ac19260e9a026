"""Sigmoid loss alone against sigmoid + LocCa decoder loss (SigLIP 2's objective), at equal steps: grounding accuracy
of a probe on the frozen image tokens, and zero-shot accuracy.

    python benchmarks/locca_quality.py --json benchmarks/results/locca_quality.json   # the full run (2-core CPU)
    python benchmarks/locca_quality.py --smoke --json /tmp/locca_smoke.json             # what CI runs

Both arms train the same tiny SigLIP with a LocCa decoder (conf/model/tiny_siglip_locca.yaml, experiment
demo_siglip_locca) on the grounding canvases (`contrastive-data demo --grounding`: the first --train-canvases of
them), from the same seed, for the same steps and batches: `sigmoid` with loss=siglip (the decoder sits idle), and
`sigmoid_locca` with loss=siglip_locca. Each run is then scored by `contrastive-eval grounding`'s probe (accuracy at
IoU >= 0.5 on --test-canvases held-out canvases; the probe seeded like the run) and zero-shot on the first
--test-samples Fashion-MNIST test images (28 px, upsampled to the model's 64 px by its eval transform); LocCa runs
also report the decoder's own referring accuracy. Training runs in this process, one run after another.

The JSON holds every run, the mean and sample standard deviation per arm, the load average, the commit and the
command. A difference counts only beyond 2 standard deviations (of the difference of the means).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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
from contrastive.eval.evaluators import build_evaluators  # noqa: E402
from contrastive.eval.grounding import ProbeSettings, evaluate_grounding  # noqa: E402
from contrastive.train.trainer import Trainer  # noqa: E402

ARMS = {"sigmoid": "siglip", "sigmoid_locca": "siglip_locca"}  # arm -> loss
METRICS = ("probe_acc_iou50", "zeroshot_acc1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "locca_quality")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-canvases", type=int, default=1000)
    parser.add_argument("--test-canvases", type=int, default=200)
    parser.add_argument("--test-samples", type=int, default=1000, help="first N Fashion-MNIST test images")
    parser.add_argument("--probe-steps", type=int, default=400)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI): 1 seed x 2 steps, 32 canvases")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.batch_size, args.train_canvases, args.test_canvases = 1, 2, 8, 32, 8
        args.test_samples, args.probe_steps = 64, 5
    return args


def train_one(args: argparse.Namespace, grounding_root: Path, eval_root: Path, arm: str, seed: int) -> dict:
    run_dir = args.work_dir / "runs" / f"{arm}_seed{seed}"
    overrides = [
        "experiment=demo_siglip_locca", f"loss={ARMS[arm]}", f"name=locca_{arm}_{seed}", f"run_dir={run_dir}",
        f"seed={seed}", f"data.sources.0.shards={grounding_root / 'train'}", f"data.batch_size={args.batch_size}",
        f"trainer.max_steps={args.steps}", f"trainer.checkpoint_every={args.steps}",
        f"trainer.log_every={1 if args.smoke else 10}", f"optim.warmup_steps={max(1, args.steps // 10)}",
        "trainer.progress_bar=false", "logger.wandb.mode=disabled", "data.num_workers=0",
        f"data.shuffle_buffer={64 if args.smoke else 1000}", f"eval.zeroshot.0.root={eval_root}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    shutil.rmtree(run_dir, ignore_errors=True)  # every run starts afresh, whatever an earlier one left
    started = time.perf_counter()
    trainer = Trainer(cfg, evaluators=build_evaluators(cfg.eval))
    result = trainer.train()
    trained = time.perf_counter() - started
    shutdown_distributed()
    encoder = load_encoder(run_dir, device="cpu")
    grounding = evaluate_grounding(encoder, grounding_root, torch.device("cpu"),
                                   ProbeSettings(steps=args.probe_steps, seed=seed))
    return {"arm": arm, "seed": seed, "zeroshot_acc1": result.eval_metrics["eval/fashion-mnist/acc1"], **grounding,
            "final_loss": result.final_loss, "train_seconds": trained,
            "seconds": time.perf_counter() - started}


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for arm in ARMS:
        mine = [run for run in runs if run["arm"] == arm]
        summary[arm] = {"seeds": len(mine)}
        for metric in (*METRICS, "decoder_referring_acc_iou50"):
            values = [run[metric] for run in mine if metric in run]
            if values:
                summary[arm][f"{metric}_mean"] = statistics.mean(values)
                summary[arm][f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    for metric in METRICS:
        difference = summary["sigmoid_locca"][f"{metric}_mean"] - summary["sigmoid"][f"{metric}_mean"]
        # Standard deviation of the difference of two means of n independent seeds each.
        sigma = math.sqrt(sum(summary[arm][f"{metric}_std"] ** 2 / summary[arm]["seeds"] for arm in ARMS))
        summary[f"{metric}_difference"] = {"locca_minus_sigmoid": difference, "sigma": sigma,
                                           "beyond_2_sigma": abs(difference) > 2 * sigma}
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commit = git_commit()  # the code that runs, before any later checkout changes it
    logging.basicConfig(level=logging.WARNING)
    register_configs()
    load_before = os.getloadavg()
    grounding_root = build_grounding_dataset(args.work_dir / f"grounding-{args.train_canvases}",
                                             train_canvases=args.train_canvases, test_canvases=args.test_canvases)
    eval_root = build_demo_dataset(args.work_dir / f"fashion-mnist-{args.test_samples}",
                                   samples_per_shard=max(2, args.test_samples), limit=args.test_samples).root
    runs = []
    for seed in range(args.seeds):
        for arm in ARMS:
            runs.append(train_one(args, grounding_root, eval_root, arm, seed))
            run = runs[-1]
            print(f"seed {seed} {arm:13s}: probe acc@0.5 {run['probe_acc_iou50']:.4f}, zero-shot acc1 "
                  f"{run['zeroshot_acc1']:.4f}" + (f", decoder referring acc@0.5 "
                  f"{run['decoder_referring_acc_iou50']:.4f}" if "decoder_referring_acc_iou50" in run else "")
                  + f", {run['seconds']:.0f} s", flush=True)
    summary = summarise(runs)
    for arm in ARMS:
        print(f"{arm:13s}: " + ", ".join(f"{metric} {summary[arm][f'{metric}_mean']:.4f} +- "
                                         f"{summary[arm][f'{metric}_std']:.4f}" for metric in METRICS)
              + f" over {summary[arm]['seeds']} seeds")
    report = {
        "benchmark": "locca_quality", "commit": commit,
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
