"""Curation throughput: `contrastive-data score` and `filter` in samples per second, filtering beside plain tar
copying of the same kept samples in the same run.

    python benchmarks/score_throughput.py --json /tmp/score_throughput.json [--model runs/demo]

Shards: JPEG images with captions and img2dataset json. Scoring: one process, the given encoder (default: the
test_tiny model of conf/model with its random initialisation, which measures the pipeline rather than a tower).
Filtering keeps the best half by similarity and writes evened-out shards with the score added to each json; the
reference reads the same input shards with tarfile and writes the kept samples' members unchanged. Reported:
medians of alternating rounds, and filter / copy (target >= 0.8).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from contrastive.config import ModelConfig  # noqa: E402
from contrastive.curation.filtering import filter_shards, select  # noqa: E402
from contrastive.curation.scoring import ScoreOptions, read_scores, score_shards  # noqa: E402
from contrastive.data.reader import split_key  # noqa: E402
from contrastive.encoders import encoder_from_model, load_encoder  # noqa: E402
from contrastive.models import build_model  # noqa: E402


def build_shards(root: Path, samples: int, per_shard: int, size: int) -> list[str]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    urls = []
    for shard in range(-(-samples // per_shard)):
        path = root / f"{shard}.tar"
        with tarfile.open(path, "w") as archive:
            for index in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG",
                                                                                          quality=90)
                files = {"jpg": buffer.getvalue(), "txt": f"a photo of item {index}.".encode(),
                         "json": json.dumps({"url": f"http://example.com/{index}.jpg"}).encode()}
                for extension, data in files.items():
                    info = tarfile.TarInfo(f"{index:08d}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def copy_kept(urls: list[str], kept: set[tuple[str, str]], out: Path) -> None:
    """The reference: every input read with tarfile, the kept samples' members written unchanged."""
    out.mkdir()
    with tarfile.open(out / "copy.tar", "w") as target:
        for url in urls:
            with tarfile.open(url, "r|") as source:
                for member in source:
                    if (url, split_key(member.name)[0]) in kept:
                        target.addfile(member, source.extractfile(member))


def git_commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return result.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="anything load_encoder reads; default: random test_tiny")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model:
        encoder = load_encoder(args.model)
    else:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                  OmegaConf.load(REPO / "conf/model/test_tiny.yaml")))
        torch.manual_seed(0)
        encoder = encoder_from_model(build_model(cfg).eval(), "test_tiny (random)")
    root = Path(tempfile.mkdtemp(prefix="score_throughput_"))
    try:
        urls = build_shards(root / "shards", args.samples, args.samples_per_shard, args.image_size)
        scoring, filtering, copying = [], [], []
        for round_ in range(args.rounds):
            scores = root / f"scores_{round_}.parquet"
            start = time.perf_counter()
            score_shards(urls, encoder, scores, rank=0, world_size=1, barrier=lambda: None,
                         device=torch.device("cpu"), options=ScoreOptions(batch_size=256), progress=False)
            scoring.append(args.samples / (time.perf_counter() - start))
            selection = select(read_scores(scores)[0], None, 0.5)
            start = time.perf_counter()  # alternate filter and copy, so load from other jobs falls on both alike
            filter_shards(urls, selection, root / f"filtered_{round_}", samples_per_shard=512, keep_list=False,
                          provenance={}, progress=False)
            filtering.append(args.samples / (time.perf_counter() - start))
            start = time.perf_counter()
            copy_kept(urls, set(selection.kept), root / f"copied_{round_}")
            copying.append(args.samples / (time.perf_counter() - start))
    finally:
        shutil.rmtree(root)
    figures = {"commit": git_commit(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "model": encoder.name, "samples": args.samples, "image_size": args.image_size, "rounds": args.rounds,
               "kept_fraction": 0.5, "score_samples_per_second": statistics.median(scoring),
               "filter_samples_per_second": statistics.median(filtering),
               "tar_copy_samples_per_second": statistics.median(copying)}
    figures["filter_over_copy"] = figures["filter_samples_per_second"] / figures["tar_copy_samples_per_second"]
    figures["target_filter_over_copy"] = 0.8
    for name in ("score", "filter", "tar_copy"):
        print(f"{name:<10}{figures[name + '_samples_per_second']:>12.1f} samples/s (input samples)")
    print(f"filter / plain tar copy: {figures['filter_over_copy']:.2f}   target >= 0.8")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
