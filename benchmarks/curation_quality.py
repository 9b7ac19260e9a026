"""Curation's worth on a noisy demo set: CLIP-score filtering against no filtering at equal steps, the filter's
precision and recall against the known corrupted captions, and dedup recall on planted copies of test images.

    python benchmarks/curation_quality.py --json benchmarks/results/curation_quality.json   # the full run (2-core CPU)
    python benchmarks/curation_quality.py --smoke --json /tmp/curation_smoke.json           # what CI runs

1. Data. The first --scorer-samples Fashion-MNIST training images (the demo set, 28 px) form a clean subset; the
   next --pool-samples form the pool, in which --noise of the captions (chosen by a seeded draw, keys recorded) are
   replaced by a caption of another class (a training template with a different class name), as web alt-text is;
   their keys are written to WORK/curated/corrupted.txt.
2. Scorer. A CLIP (default the one-block-per-tower test_tiny: a shared, loaded 2-core CPU runs 7 trainings in
   about 10 minutes) trained on the clean subset alone (--scorer-steps), then
   `contrastive-data score POOL --model SCORER` and `contrastive-data filter POOL --top-fraction F`: the best F of
   the pool by image-text similarity is kept (F defaults to 1 - noise, DataComp's CLIP-score baseline, so a
   perfect filter drops exactly the corrupted pairs). Precision and recall are exact counts over the corrupted
   keys: a dropped pair is a detection; precision = corrupted dropped / dropped, recall = corrupted dropped /
   corrupted.
3. Training. For each of --seeds seeds, the same model trains --steps steps of --batch-size on the unfiltered pool
   and on the filtered shards (resampled streams, so both see the same number of samples), and is scored zero-shot
   on the first --test-samples held-out test images. A difference counts only when the means differ by more than
   2 sigma, sigma = sqrt(std_a^2 + std_b^2) (the spread of one seed's difference; stricter than the standard error).
4. Dedup. --planted-per-transform test images per transformation (re-encoded, resized, cropped, flipped;
   contrastive.curation.dedup.transformed_copy) are planted in the pool, and `contrastive-data dedup POOL
   --eval-shards TEST` runs at its calibrated thresholds. Reported: the planted copies removed per transformation,
   and the pool's own images removed (false positives: Fashion-MNIST's same-class look-alikes, a few of which may
   be true duplicates in the source).

Training runs in this process, one run after another. The JSON holds every run, the mean and sample standard
deviation per arm, the filter and dedup figures, the load average before and after, the git commit and the
command.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.provenance import git_commit  # noqa: E402
from contrastive.cli.data import main as data_cli  # noqa: E402
from contrastive.config import register_configs  # noqa: E402
from contrastive.curation.dedup import TRANSFORMS, transformed_copy  # noqa: E402
from contrastive.data.demo import FASHION_MNIST_CLASSNAMES, TRAIN_TEMPLATES, build_demo_dataset  # noqa: E402
from contrastive.data.reader import iter_shard  # noqa: E402
from contrastive.dist import shutdown_distributed  # noqa: E402
from contrastive.eval.evaluators import build_evaluators  # noqa: E402
from contrastive.train.trainer import Trainer  # noqa: E402

ARMS = ("unfiltered", "filtered")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "curation_quality")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scorer-samples", type=int, default=2000, help="clean training images for the scorer")
    parser.add_argument("--pool-samples", type=int, default=4000, help="training images of the noisy pool")
    parser.add_argument("--test-samples", type=int, default=1000, help="first N Fashion-MNIST test images")
    parser.add_argument("--noise", type=float, default=0.4, help="fraction of pool captions replaced")
    parser.add_argument("--top-fraction", type=float, default=None, help="filter keeps this best fraction; "
                        "default 1 - noise")
    parser.add_argument("--scorer-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="test_tiny", help="a conf/model/ file")
    parser.add_argument("--planted-per-transform", type=int, default=16)
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (CI): 1 seed x 3 steps of the test model, 256-sample pool")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.scorer_samples, args.pool_samples, args.test_samples = 1, 128, 256, 128
        args.scorer_steps, args.steps, args.batch_size = 3, 3, 32
        args.planted_per_transform, args.calibration_samples = 2, 64
    if args.top_fraction is None:
        args.top_fraction = round(1 - args.noise, 6)
    return args


def write_shards(directory: Path, samples: list[dict], per_shard: int) -> Path:
    """img2dataset-layout shards of `samples` (each `__key__` plus byte members), `per_shard` to a shard."""
    directory.mkdir(parents=True)
    for number, start in enumerate(range(0, len(samples), per_shard)):
        with tarfile.open(directory / f"{number}.tar", "w") as archive:
            for sample in samples[start:start + per_shard]:
                for extension, data in sample.items():
                    if extension.startswith("__"):
                        continue
                    info = tarfile.TarInfo(f"{sample['__key__']}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return directory


def read_samples(directory: Path) -> list[dict]:
    """Every sample of the demo shards under `directory`, in shard order; the demo set has no bad samples."""
    skipped: Counter = Counter()
    samples = [sample for shard in sorted(directory.glob("*.tar"), key=lambda p: int(p.stem))
               for sample in iter_shard(str(shard), skipped)]
    if skipped:
        raise RuntimeError(f"unreadable demo samples in {directory}: {dict(skipped)}")
    return samples


def keys_in(directory: Path) -> set[str]:
    keys = set()
    for shard in directory.glob("*.tar"):
        with tarfile.open(shard) as archive:
            keys |= {member.name.split(".")[0] for member in archive if member.isreg()}
    return keys


def corrupt(samples: list[dict], noise: float, rng: np.random.Generator) -> tuple[list[dict], set[str]]:
    """The pool with round(noise * N) captions (seeded choice) replaced by a caption of another class."""
    chosen = set(rng.choice(len(samples), size=round(noise * len(samples)), replace=False).tolist())
    noisy, corrupted = [], set()
    for index, sample in enumerate(samples):
        members = {name: sample[name] for name in ("__key__", "png", "txt", "json")}
        if index in chosen:
            label = json.loads(sample["json"])["label"]
            other = (label + int(rng.integers(1, len(FASHION_MNIST_CLASSNAMES)))) % len(FASHION_MNIST_CLASSNAMES)
            caption = TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))].format(
                c=FASHION_MNIST_CLASSNAMES[other])
            members["txt"] = caption.encode()
            corrupted.add(sample["__key__"])
        noisy.append(members)
    return noisy, corrupted


def planted_copies(test_samples: list[dict], per_transform: int, rng: np.random.Generator) -> list[dict]:
    planted = []
    for index, sample in enumerate(test_samples[:per_transform * len(TRANSFORMS)]):
        kind = TRANSFORMS[index % len(TRANSFORMS)]
        image = transformed_copy(Image.open(io.BytesIO(sample["png"])).convert("L"), kind, rng)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        label = int(sample["cls"])
        planted.append({"__key__": f"planted_{kind}_{sample['__key__']}", "png": buffer.getvalue(),
                        "txt": f"a photo of a {FASHION_MNIST_CLASSNAMES[label]}.".encode(),
                        "json": json.dumps({"planted": kind, "source": sample["__key__"]}).encode()})
    return planted


def run_cli(argv: list[str]) -> None:
    if data_cli(argv) != 0:
        raise RuntimeError(f"contrastive-data {' '.join(argv)} failed")
    shutdown_distributed()  # `score` sets up a one-process group; the next trainer makes its own


def train(args: argparse.Namespace, name: str, shards: Path, eval_root: Path, seed: int, steps: int) -> dict:
    run_dir = args.work_dir / "runs" / name
    overrides = [
        "experiment=demo", f"model={args.model}", f"name=curation_{name}", f"run_dir={run_dir}", f"seed={seed}",
        f"data.sources.0.shards={shards}", "data.resampled=true", f"data.batch_size={args.batch_size}",
        f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps}", f"trainer.log_every={max(1, steps // 10)}",
        f"optim.warmup_steps={max(1, steps // 10)}", "trainer.progress_bar=false", "logger.wandb.mode=disabled",
        # One thread: on the shared 2-core machine two threads per process ran 4x slower than one (measured).
        "trainer.threads_per_process=1",
        f"data.num_workers={0 if args.smoke else 1}", f"data.shuffle_buffer={64 if args.smoke else 2000}",
        f"eval.zeroshot.0.root={eval_root}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    shutil.rmtree(run_dir, ignore_errors=True)  # every run starts afresh, whatever an earlier one left
    started = time.perf_counter()
    trainer = Trainer(cfg, evaluators=build_evaluators(cfg.eval))
    result = trainer.train()
    trainer.loader = None  # stops its data-loader worker
    shutdown_distributed()
    return {"run_dir": str(run_dir), "seed": seed, "steps": steps,
            "zeroshot_acc1": result.eval_metrics["eval/fashion-mnist/acc1"],
            "final_loss": result.final_loss, "seconds": time.perf_counter() - started}


def filter_figures(pool_keys: set[str], kept: set[str], corrupted: set[str]) -> dict:
    dropped = pool_keys - kept
    caught = len(dropped & corrupted)
    return {"pool": len(pool_keys), "corrupted": len(corrupted), "kept": len(kept), "dropped": len(dropped),
            "corrupted_dropped": caught, "clean_dropped": len(dropped) - caught,
            "precision": caught / len(dropped) if dropped else 0.0,
            "recall": caught / len(corrupted) if corrupted else 0.0,
            "corrupted_fraction_before": len(corrupted) / len(pool_keys),
            "corrupted_fraction_after": len(kept & corrupted) / len(kept) if kept else 0.0}


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for arm in ARMS:
        acc1 = [run["zeroshot_acc1"] for run in runs if run["arm"] == arm]
        summary[arm] = {"zeroshot_acc1_mean": statistics.mean(acc1),
                        "zeroshot_acc1_std": statistics.stdev(acc1) if len(acc1) > 1 else 0.0, "seeds": len(acc1)}
    difference = summary["filtered"]["zeroshot_acc1_mean"] - summary["unfiltered"]["zeroshot_acc1_mean"]
    sigma = math.hypot(summary["filtered"]["zeroshot_acc1_std"], summary["unfiltered"]["zeroshot_acc1_std"])
    summary["filtered_minus_unfiltered"] = difference
    summary["sigma"] = sigma
    summary["beyond_2_sigma"] = len({run["seed"] for run in runs}) >= 3 and abs(difference) > 2 * sigma
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commit = git_commit()  # the code that runs, before any later checkout changes it
    load_before = os.getloadavg()
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING)
    register_configs()
    work = args.work_dir
    shutil.rmtree(work / "curated", ignore_errors=True)
    train_total = args.scorer_samples + args.pool_samples
    train_root = build_demo_dataset(work / f"fashion-mnist-{train_total}", samples_per_shard=1000,
                                    limit=train_total).root
    eval_root = build_demo_dataset(work / f"fashion-mnist-{args.test_samples}", samples_per_shard=1000,
                                   limit=args.test_samples).root
    rng = np.random.default_rng(0)
    samples = read_samples(train_root / "train")
    per_shard = max(16, args.pool_samples // 8)  # 8 pool shards: enough for a resampled stream's shuffle
    clean = write_shards(work / "curated" / "clean", samples[:args.scorer_samples], per_shard)
    pool_samples, corrupted = corrupt(samples[args.scorer_samples:train_total], args.noise, rng)
    pool = write_shards(work / "curated" / "pool", pool_samples, per_shard)
    (work / "curated" / "corrupted.txt").write_text("".join(f"{key}\n" for key in sorted(corrupted)))

    scorer = train(args, "scorer", clean, eval_root, seed=0, steps=args.scorer_steps)
    print(f"scorer on {args.scorer_samples} clean pairs: zero-shot acc1 {scorer['zeroshot_acc1']:.4f}, "
          f"{scorer['seconds']:.0f} s", flush=True)
    scores = work / "curated" / "scores.parquet"
    scored_at = time.perf_counter()
    run_cli(["score", str(pool), "--model", scorer["run_dir"], "--out", str(scores), "--device", "cpu",
             "--no-progress"])
    filtered = work / "curated" / "filtered"
    run_cli(["filter", str(pool), "--scores", str(scores), "--top-fraction", str(args.top_fraction),
             "--out", str(filtered), "--samples-per-shard", str(per_shard), "--no-progress"])
    curation_seconds = time.perf_counter() - scored_at
    figures = filter_figures({sample["__key__"] for sample in pool_samples}, keys_in(filtered), corrupted)
    print(f"filter top {args.top_fraction:g}: kept {figures['kept']} of {figures['pool']}; corrupted pairs "
          f"dropped {figures['corrupted_dropped']} of {figures['corrupted']}: precision {figures['precision']:.4f}, "
          f"recall {figures['recall']:.4f}", flush=True)

    runs = []
    for seed in range(args.seeds):
        for arm, shards in zip(ARMS, (pool, filtered)):
            runs.append({"arm": arm, **train(args, f"{arm}_seed{seed}", shards, eval_root, seed, args.steps)})
            print(f"seed {seed} {arm:10s}: zero-shot acc1 {runs[-1]['zeroshot_acc1']:.4f}, "
                  f"{runs[-1]['seconds']:.0f} s", flush=True)
    summary = summarise(runs)
    for arm in ARMS:
        print(f"{arm:10s}: acc1 {summary[arm]['zeroshot_acc1_mean']:.4f} +- {summary[arm]['zeroshot_acc1_std']:.4f} "
              f"over {summary[arm]['seeds']} seeds")
    print(f"filtered - unfiltered: {summary['filtered_minus_unfiltered']:+.4f} (2 sigma = {2 * summary['sigma']:.4f}):"
          f" {'counts' if summary['beyond_2_sigma'] else 'does not count'}", flush=True)

    dedup = dedup_figures(args, pool_samples, eval_root, rng)
    print(f"dedup: planted copies removed by transformation {json.dumps(dedup['planted_removed'])} of "
          f"{args.planted_per_transform} each; pool images removed {dedup['pool_images_removed']} of "
          f"{dedup['pool_images']}", flush=True)
    report = {
        "benchmark": "curation_quality", "commit": commit,
        "command": " ".join(["python", f"benchmarks/{Path(__file__).name}",
                             *(sys.argv[1:] if argv is None else argv)]),
        "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
        "seconds": time.perf_counter() - started,
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "scorer": scorer, "filter": {"rule": f"--top-fraction {args.top_fraction:g}", **figures,
                                     "score_and_filter_seconds": curation_seconds},
        "runs": runs, "summary": summary, "dedup": dedup,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def dedup_figures(args: argparse.Namespace, pool_samples: list[dict], eval_root: Path,
                  rng: np.random.Generator) -> dict:
    planted = planted_copies(read_samples(eval_root / "test"), args.planted_per_transform, rng)
    pool_keys = [sample["__key__"] for sample in pool_samples]
    # Planted copies go to the end of the pool's shards, so calibration copies the pool's own images.
    directory = write_shards(args.work_dir / "curated" / "pool_planted", pool_samples + planted,
                             max(16, (len(pool_samples) + len(planted)) // 8))
    out = args.work_dir / "curated" / "deduplicated"
    run_cli(["dedup", str(directory), "--eval-shards", str(eval_root / "test"), "--out", str(out),
             "--calibration-samples", str(args.calibration_samples), "--keep-list", "--no-progress"])
    kept = set((out / "keep.txt").read_text().split())
    manifest = json.loads((out / "manifest.json").read_text())
    removed = {kind: sum(sample["__key__"] not in kept for sample in planted
                         if sample["__key__"].startswith(f"planted_{kind}_")) for kind in TRANSFORMS}
    return {"planted_per_transform": args.planted_per_transform, "planted_removed": removed,
            "planted_recall": {kind: count / args.planted_per_transform for kind, count in removed.items()},
            "pool_images": len(pool_keys), "pool_images_removed": sum(key not in kept for key in pool_keys),
            "rules": manifest["rules"], "threshold": manifest["dedup"]["threshold"],
            "eval_threshold": manifest["dedup"]["eval_threshold"], "calibration": manifest["dedup"].get("calibration"),
            "eval_calibration": manifest["dedup"].get("eval_calibration")}


if __name__ == "__main__":
    sys.exit(main())
