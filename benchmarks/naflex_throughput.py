"""NaFlex against fixed resolution at equal token budgets: images/s and tokens/s of the data path alone and of the
full training step, with NaFlex's padding overhead.

    python benchmarks/naflex_throughput.py --json benchmarks/results/naflex_throughput.json
    python benchmarks/naflex_throughput.py --smoke --json /tmp/naflex_throughput_smoke.json   # what CI runs

Data: JPEGs of random content and random sizes (10 to 90 pixels a side, every aspect from 1:9 to 9:1) in shards;
throughput does not depend on what the pixels show. For each budget L in --seq-lens, the fixed arm trains on
S x S crops with (S / P)^2 = L patches (the training stream's random resized crop), the NaFlex arm on patch
sequences of length L (data.naflex_seq_lens=[L]). Both arms run the same tower, model=tiny_naflex_siglip (timm's
NaFlexVit takes ordinary images too), so only the input representation differs. Tokens are the patches the tower
attends over that carry an image: all L of them for the fixed arm, the valid ones for NaFlex (padding is counted as
overhead, not as tokens). The data path is the training stream in this process (data.num_workers=0), read for
--steps batches; the full step is the trainer's normalisation of uint8 images (the fixed arm's; NaFlex patches
arrive normalised from the data path), forward, sigmoid loss and backward on those batches, timed per step, the two
arms alternating step by step so machine noise hits them alike. Figures are medians over steps; ratios are NaFlex
over fixed at the same L, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.provenance import git_commit  # noqa: E402
from contrastive.config import LossConfig, register_configs  # noqa: E402
from contrastive.data.loader import build_train_loader  # noqa: E402
from contrastive.data.transforms import BatchNormalize  # noqa: E402
from contrastive.dist.collectives import LocalCollectives  # noqa: E402
from contrastive.encoders import preprocess_from_config  # noqa: E402
from contrastive.losses import build_loss  # noqa: E402
from contrastive.models import build_model, build_tokenizer  # noqa: E402
from tests.data_factory import jpeg, write_tar  # noqa: E402

PATCH = 7  # model=tiny_naflex_siglip's patch side


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "naflex_throughput")
    parser.add_argument("--seq-lens", default="16,36,64", help="token budgets L, each a square of a patch count")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI): L=16, 2 steps of 8")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.steps, args.batch_size = "16", 2, 8
    args.seq_lens = [int(length) for length in args.seq_lens.split(",")]
    return args


def write_shards(root: Path, samples: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    per_shard = max(1, samples // 4)
    for shard in range(4):
        write_tar(root / f"{shard}.tar", [
            (f"s{shard}_{index:05d}", {"jpg": jpeg((rng.randint(10, 90), rng.randint(10, 90)), index),
                                      "txt": f"item {index}".encode()}) for index in range(per_shard)])
    return root


def loader_for(args: argparse.Namespace, shards: Path, length: int, naflex: bool):
    side = int(round(length ** 0.5)) * PATCH
    overrides = ["model=tiny_naflex_siglip", f"data.sources.0.shards={shards}", f"data.batch_size={args.batch_size}",
                 "data.num_workers=0", "data.shuffle_buffer=100"]
    overrides += [f"data.naflex_seq_lens=[{length}]"] if naflex else [f"model.vision.image_size={side}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    loader = build_train_loader(cfg.data, preprocess_from_config(cfg.model), build_tokenizer(cfg.model), rank=0,
                                world_size=1, seed=0)
    return cfg, loader


def read_batches(loader, steps: int) -> tuple[list, float]:
    batches = iter(loader)
    next(batches)  # opening shards and the first shuffle buffer fill are not the steady state
    started = time.perf_counter()
    read = [next(batches) for _ in range(steps)]
    return read, time.perf_counter() - started


def image_tokens(batch) -> int:
    if batch.patch_valid is not None:
        return int(batch.patch_valid.sum())
    return len(batch) * (batch.images.shape[-1] // PATCH) * (batch.images.shape[-2] // PATCH)


def step_seconds(model, loss, normalize: BatchNormalize, batch) -> float:
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    batch = normalize.batch(batch)  # the trainer's per-step normalisation: fixed-size uint8 images only
    extra = {} if batch.patch_coord is None else {"patch_coord": batch.patch_coord, "patch_valid": batch.patch_valid}
    loss(model(batch.images, batch.tokens, **extra), batch, LocalCollectives()).loss.backward()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    register_configs()
    shards = write_shards(args.work_dir / "shards", max(40, (args.steps + 2) * args.batch_size))
    results = {}
    for length in args.seq_lens:
        arms = {}
        for name, naflex in (("fixed", False), ("naflex", True)):
            cfg, loader = loader_for(args, shards, length, naflex)
            batches, seconds = read_batches(loader, args.steps)
            images = args.steps * args.batch_size
            tokens = sum(image_tokens(batch) for batch in batches)
            slots = sum(batch.patch_valid.numel() if naflex else image_tokens(batch) for batch in batches)
            arms[name] = {"batches": batches, "data_images_per_s": images / seconds,
                          "data_tokens_per_s": tokens / seconds, "padding_fraction": 1 - tokens / slots,
                          "tokens_per_image": tokens / images}
        torch.manual_seed(0)
        model = build_model(cfg.model).train()
        loss = build_loss(LossConfig(name="siglip"))
        preprocess = preprocess_from_config(cfg.model)
        normalize = BatchNormalize(preprocess.mean, preprocess.std)
        step_seconds(model, loss, normalize, arms["fixed"]["batches"][0])  # warm-up
        timings = {name: [] for name in arms}
        for step in range(args.steps):
            for name in arms:
                timings[name].append(step_seconds(model, loss, normalize, arms[name]["batches"][step]))
        for name, arm in arms.items():
            median = statistics.median(timings[name])
            arm["step_seconds_median"] = median
            arm["step_images_per_s"] = args.batch_size / median
            arm["step_tokens_per_s"] = arm["tokens_per_image"] * args.batch_size / median
            del arm["batches"]
        ratios = {key: arms["naflex"][key] / arms["fixed"][key]
                  for key in ("data_images_per_s", "data_tokens_per_s", "step_images_per_s", "step_tokens_per_s")}
        results[str(length)] = {**arms, "naflex_over_fixed": ratios}
        print(f"L={length}: fixed {arms['fixed']['step_tokens_per_s']:.0f} tokens/s per step, NaFlex "
              f"{arms['naflex']['step_tokens_per_s']:.0f} ({ratios['step_tokens_per_s']:.2f}x), padding "
              f"{arms['naflex']['padding_fraction']:.3f}; data path {arms['fixed']['data_images_per_s']:.0f} vs "
              f"{arms['naflex']['data_images_per_s']:.0f} images/s ({ratios['data_images_per_s']:.2f}x)")
    report = {
        "benchmark": "naflex_throughput", "commit": git_commit(),
        "command": " ".join(["python", f"benchmarks/{Path(__file__).name}",
                             *(sys.argv[1:] if argv is None else argv)]),
        "load_average": os.getloadavg(),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "results": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
