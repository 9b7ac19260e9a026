"""NaFlex against fixed square inputs (centre crop, squash) at equal image tokens, on variable-aspect canvases.

    python benchmarks/naflex_quality.py --json benchmarks/results/naflex_quality.json
    python benchmarks/naflex_quality.py --smoke --json /tmp/naflex_quality_smoke.json   # what CI runs

Data: real Fashion-MNIST items (contrastive.data.demo's source, with its fallback to scikit-learn's digits), 28 px
each, placed side by side on wide canvases (a row of 2 or 3 items: 56 x 28 or 84 x 28 px) or stacked on tall ones (a
column: 28 x 56 or 28 x 84 px), items of distinct classes. The caption names every item in reading order, "a coat,
then a bag, then a sneaker" (left to right, or top to bottom), so a square centre crop cuts items the caption
names. Train canvases take items from the source's train split, test canvases from its test split; test captions
are all different, so image->text retrieval has exactly one right answer per image.

Three arms per seed, each trained from the same seed for the same steps, one after another in this process, with
the same tower (model=tiny_naflex_siglip: timm's NaFlexVit takes fixed-size images too, so only the input differs):
- `naflex`: patch sequences of L = --seq-len patches (data.naflex_seq_lens=[L]); every canvas keeps its aspect
  ratio, resized to the largest 7 px patch grid with at most L patches (fewer where the aspect does not tile L);
- `center_crop`: the canvas's central square (side = its shorter side), resized to S x S with (S / 7)^2 = L;
- `squash`: the whole canvas resized to S x S, its aspect ratio lost.
The fixed arms' squares are cut from the same canvases when the shards are written, and the training stream's
random resized crop is pinned to the whole image (data.crop_scale=[1, 1]); evaluation resizes them to S x S. Image
tokens per image are counted on batches the training stream yields for each arm's own config: L for the fixed arms,
at most L valid patches for NaFlex (the JSON holds the mean).

Metrics, per final checkpoint:
- retrieval (the main one): image->text recall@1 over the test canvases' captions (contrastive-eval retrieval's
  text_retrieval_recall@1), NaFlex evaluated at --seq-len L;
- zero-shot: Fashion-MNIST test images (single square items, 28 px) classified over the item classes. A canvas
  holds several classes, so single-label zero-shot on canvases is not meaningful; this checks whether an arm still
  recognises the items themselves.
The JSON holds every run, mean and sample standard deviation per arm, per metric NaFlex's difference to each fixed
arm and whether it exceeds twice the larger standard deviation of the two (only such a difference counts), the
image tokens per arm, the load average, the git commit and the command.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.provenance import git_commit  # noqa: E402
from contrastive.config import register_configs  # noqa: E402
from contrastive.data import demo  # noqa: E402
from contrastive.data.loader import build_train_loader  # noqa: E402
from contrastive.dist import shutdown_distributed  # noqa: E402
from contrastive.encoders import load_encoder, preprocess_from_config  # noqa: E402
from contrastive.encoders.naflex import at_seq_len  # noqa: E402
from contrastive.eval.retrieval import ZeroShotRetrieval  # noqa: E402
from contrastive.eval.zeroshot import ZeroShotClassification  # noqa: E402
from contrastive.models import build_tokenizer  # noqa: E402
from contrastive.train.trainer import Trainer  # noqa: E402

ARMS = ("naflex", "center_crop", "squash")
FIXED_ARMS = ("center_crop", "squash")
METRICS = ("retrieval_recall1", "zeroshot_acc1")
PATCH = 7  # model=tiny_naflex_siglip's patch side
ITEM = 28  # pixels per item side (Fashion-MNIST's)
CONTEXT_LENGTH = 24  # tokens: three class names with "a ..., then" fit ("T-shirt/top" alone is several)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "naflex_quality")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=36, help="image tokens L, a square number (fixed: S = 7 sqrt L)")
    parser.add_argument("--train-canvases", type=int, default=4000)
    parser.add_argument("--test-canvases", type=int, default=200)
    parser.add_argument("--test-samples", type=int, default=1000, help="first N Fashion-MNIST test images (zero-shot)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (trainer.threads_per_process); on a shared CPU one is fastest")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (CI): 1 seed x 2 steps of 8, L=16, 32 train and 16 test canvases")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.batch_size, args.seq_len = 1, 2, 8, 16
        args.train_canvases, args.test_canvases, args.test_samples = 32, 16, 32
    if math.isqrt(args.seq_len) ** 2 != args.seq_len:
        parser.error(f"--seq-len must be a square number of patches, got {args.seq_len}")
    return args


def fixed_side(seq_len: int) -> int:
    return math.isqrt(seq_len) * PATCH


def caption(classnames: list[str]) -> str:
    return ", then ".join(f"a {name}" for name in classnames)


def compose_canvas(items: list[np.ndarray], wide: bool) -> np.ndarray:
    """(H, W) uint8: the items in a row (wide) or a column (tall), in caption order."""
    return np.concatenate(items, axis=1 if wide else 0)


def center_square(canvas: np.ndarray) -> np.ndarray:
    height, width = canvas.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return canvas[top:top + side, left:left + side]


def squash(canvas: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(canvas).resize((side, side), Image.Resampling.BILINEAR))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_canvases(arrays: demo.SplitArrays, classnames: tuple[str, ...], count: int, rng: np.random.Generator,
                    distinct_captions: bool) -> list[tuple[np.ndarray, str]]:
    """`count` (canvas, caption) pairs of 2 or 3 items of distinct classes, wide or tall with equal odds."""
    by_class = [np.flatnonzero(arrays.labels == label) for label in range(len(classnames))]
    if distinct_captions:  # every ordered class sequence at most once: one right caption per test image
        sequences = [list(s) for k in (2, 3) for s in itertools.permutations(range(len(classnames)), k)]
        if count > len(sequences):
            raise ValueError(f"--test-canvases {count} exceeds the {len(sequences)} distinct captions")
        chosen = [sequences[i] for i in rng.choice(len(sequences), size=count, replace=False)]
    else:
        chosen = [list(rng.choice(len(classnames), size=rng.integers(2, 4), replace=False)) for _ in range(count)]
    canvases = []
    for labels in chosen:
        items = [arrays.images[rng.choice(by_class[label])] for label in labels]
        canvases.append((compose_canvas(items, wide=bool(rng.integers(2))), caption([classnames[i] for i in labels])))
    return canvases


def write_arm_split(directory: Path, canvases: list[tuple[np.ndarray, str]], arm: str, side: int) -> None:
    """One arm's view of a split as img2dataset-layout shards (png + txt), the retrieval layout too."""
    directory.mkdir(parents=True)
    with wds.ShardWriter(str(directory / "%d.tar"), maxcount=1000, verbose=0, encoder=False, mtime=0) as writer:
        for index, (canvas, text) in enumerate(canvases):
            image = canvas if arm == "naflex" else center_square(canvas) if arm == "center_crop" else squash(canvas,
                                                                                                               side)
            writer.write({"__key__": f"{index:08d}", "png": _png(image), "txt": text.encode("utf-8")})
    (directory / "nshards.txt").write_text(f"{math.ceil(len(canvases) / 1000)}\n")


def build_canvas_sets(args: argparse.Namespace) -> dict[str, Path]:
    """Each arm's root (ROOT/train, ROOT/test), all three cut from the same canvases."""
    source_name, source_path, _ = demo.resolve_source(None)
    data = demo.load_fashion_mnist(source_path) if source_name == demo.FASHION_MNIST_SOURCE else demo.load_digits()
    rng = np.random.default_rng(0)  # the data is the same for every seed: seeds vary the training only
    splits = {"train": sample_canvases(data.splits["train"], data.classnames, args.train_canvases, rng, False),
              "test": sample_canvases(data.splits["test"], data.classnames, args.test_canvases, rng, True)}
    roots = {}
    for arm in ARMS:
        roots[arm] = args.work_dir / "canvases" / arm
        shutil.rmtree(roots[arm], ignore_errors=True)
        for split, canvases in splits.items():
            write_arm_split(roots[arm] / split, canvases, arm, fixed_side(args.seq_len))
    return roots


def run_overrides(args: argparse.Namespace, root: Path, arm: str, seed: int) -> list[str]:
    overrides = [
        "experiment=demo_siglip", "model=tiny_naflex_siglip", f"model.text.context_length={CONTEXT_LENGTH}",
        f"name=naflex_quality_{arm}_{seed}", f"run_dir={args.work_dir / 'runs' / f'{arm}_seed{seed}'}",
        f"seed={seed}", "dist.strategy=ddp",  # one process: no wrapper either way
        f"trainer.threads_per_process={args.threads}",
        f"data.sources.0.shards={root / 'train'}", f"data.batch_size={args.batch_size}",
        f"trainer.max_steps={args.steps}", f"trainer.checkpoint_every={args.steps}",
        f"trainer.log_every={1 if args.smoke else 10}", f"optim.warmup_steps={max(1, args.steps // 10)}",
        "trainer.progress_bar=false", "logger.wandb.mode=disabled", f"data.num_workers={0 if args.smoke else 1}",
        f"data.shuffle_buffer={64 if args.smoke else 2000}",
    ]
    if arm == "naflex":
        overrides.append(f"data.naflex_seq_lens=[{args.seq_len}]")
    else:
        overrides += [f"model.vision.image_size={fixed_side(args.seq_len)}", "data.crop_scale=[1.0,1.0]"]
    return overrides


def tokens_fed(cfg, batches: int = 2) -> list[float]:
    """Image tokens per image on `batches` batches the training stream yields for this config (valid patches for
    NaFlex, the whole patch grid for fixed-size images)."""
    loader = build_train_loader(cfg.data, preprocess_from_config(cfg.model),
                                build_tokenizer(cfg.model), rank=0, world_size=1, seed=cfg.seed)
    counts = []
    for batch, _ in zip(loader, range(batches)):
        if batch.patch_valid is not None:
            counts += batch.patch_valid.sum(dim=1).tolist()
        else:
            counts += [(batch.images.shape[-2] // PATCH) * (batch.images.shape[-1] // PATCH)] * len(batch)
    return counts


def train_one(args: argparse.Namespace, roots: dict[str, Path], zeroshot: ZeroShotClassification, arm: str,
              seed: int) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=run_overrides(args, roots[arm], arm, seed))
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # every run starts afresh, whatever an earlier one left
    started = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.train()
    seconds = time.perf_counter() - started
    trainer.loader = None  # stops its data-loader worker
    shutdown_distributed()
    tokens = tokens_fed(cfg)
    encoder = load_encoder(cfg.run_dir)  # evaluated at the trainer's thread count
    if arm == "naflex":
        encoder = at_seq_len(encoder, args.seq_len)
    retrieval = ZeroShotRetrieval("canvases", roots[arm]).run(encoder, torch.device("cpu"))
    return {
        "arm": arm, "seed": seed,
        "retrieval_recall1": retrieval["text_retrieval_recall@1"],
        "retrieval_recall5": retrieval["text_retrieval_recall@5"],
        "zeroshot_acc1": zeroshot.run(encoder, torch.device("cpu"))["acc1"],
        "image_tokens_per_image_mean": statistics.mean(tokens), "image_tokens_per_image_max": max(tokens),
        "final_loss": result.final_loss, "train_seconds": seconds,
    }


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for arm in ARMS:
        mine = [run for run in runs if run["arm"] == arm]
        summary[arm] = {"seeds": len(mine), "train_seconds_mean": statistics.mean(r["train_seconds"] for r in mine),
                        "image_tokens_per_image_mean": statistics.mean(r["image_tokens_per_image_mean"] for r in mine)}
        for metric in METRICS:
            values = [run[metric] for run in mine]
            summary[arm][f"{metric}_mean"] = statistics.mean(values)
            summary[arm][f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    for metric in METRICS:
        for fixed in FIXED_ARMS:
            difference = summary["naflex"][f"{metric}_mean"] - summary[fixed][f"{metric}_mean"]
            sigma = max(summary[arm][f"{metric}_std"] for arm in ("naflex", fixed))
            summary[f"{metric}_naflex_minus_{fixed}"] = difference
            # Counted only beyond twice the larger per-arm standard deviation (never with a single seed).
            summary[f"{metric}_naflex_minus_{fixed}_counts"] = sigma > 0 and abs(difference) > 2 * sigma
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commit = git_commit()  # the code that runs, before any later checkout changes it
    load_before = os.getloadavg()
    logging.basicConfig(level=logging.WARNING)
    register_configs()
    roots = build_canvas_sets(args)
    items = demo.build_demo_dataset(args.work_dir / f"fashion-mnist-test-{args.test_samples}",
                                    samples_per_shard=max(2, args.test_samples), limit=args.test_samples)
    zeroshot = ZeroShotClassification("items", items.root)
    runs = []
    for seed in range(args.seeds):
        for arm in ARMS:
            runs.append(train_one(args, roots, zeroshot, arm, seed))
            run = runs[-1]
            print(f"seed {seed} {arm:11s}: retrieval R@1 {run['retrieval_recall1']:.4f}, zero-shot acc1 "
                  f"{run['zeroshot_acc1']:.4f}, {run['image_tokens_per_image_mean']:.1f} tokens/image, "
                  f"{run['train_seconds']:.0f} s", flush=True)
    summary = summarise(runs)
    for arm in ARMS:
        print(f"{arm:11s}: " + ", ".join(f"{metric} {summary[arm][f'{metric}_mean']:.4f} +- "
                                         f"{summary[arm][f'{metric}_std']:.4f}" for metric in METRICS)
              + f" over {summary[arm]['seeds']} seeds")
    for metric in METRICS:
        for fixed in FIXED_ARMS:
            key = f"{metric}_naflex_minus_{fixed}"
            print(f"naflex - {fixed} {metric}: {summary[key]:+.4f} "
                  f"({'beyond' if summary[f'{key}_counts'] else 'within'} 2 sigma)")
    report = {
        "benchmark": "naflex_quality", "commit": commit,
        "command": " ".join(["python", f"benchmarks/{Path(__file__).name}",
                             *(sys.argv[1:] if argv is None else argv)]),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "fixed_image_side": fixed_side(args.seq_len),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "runs": runs, "summary": summary,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
