"""Training-data throughput: our stream against open_clip's `open_clip_train.data.get_wds_dataset`, same run.

Both read the same shards of 256x256 JPEGs with captions, make 224x224 random-resized crops (scale 0.9-1.0,
bicubic), normalise, tokenize, and batch in the same number of DataLoader workers with the same batch size.
Reported: samples per wall second and per CPU second of all processes (steady on a shared machine), timed
after the first batch of every worker (start-up excluded), medians of alternating rounds, and ours / reference.

open_clip's pipeline crashes with webdataset >= 0.2.90 (open_clip issue #935, KeyError 'fname') and
open_clip_torch[training] pins webdataset <= 0.2.86, so the reference runs in an interpreter of its own:

    python3 -m venv /work/scratch/venv-openclip
    /work/scratch/venv-openclip/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        'open_clip_torch[training]==3.3.0' 'webdataset<=0.2.86'
    python benchmarks/data_throughput.py --reference-python /work/scratch/venv-openclip/bin/python \\
        --json /tmp/data_throughput.json

This script runs itself under that interpreter with --run-reference (it imports nothing of ours there).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

IMAGE_SIZE = 224
SOURCE_SIZE = 256
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def build_shards(root: Path, samples: int, per_shard: int) -> str:
    """Photo-like JPEGs (smooth gradients plus noise, quality 90) with one-line captions; returns a brace pattern."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    shards = -(-samples // per_shard)
    pattern = str(root / f"{{0..{shards - 1}}}.tar")
    if (root / f"{shards - 1}.tar").exists():
        return pattern
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 160, SOURCE_SIZE)
    for shard in range(shards):
        with tarfile.open(root / f"{shard}.tar", "w") as archive:
            for index in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                base = ramp[None, :, None] + ramp[::-1][:, None, None] * rng.random(3)[None, None, :]
                pixels = np.clip(base * 0.8 + rng.normal(0, 12, (SOURCE_SIZE, SOURCE_SIZE, 3)), 0, 255)
                buffer = io.BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
                caption = f"a photo of object number {index} on a plain background.".encode()
                for extension, data in (("jpg", buffer.getvalue()), ("txt", caption)):
                    info = tarfile.TarInfo(f"{index:08d}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return pattern


def _tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process and its live descendants (Linux /proc)."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += _tree_cpu_seconds(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def time_batches(loader, batches: int, workers: int, batch_size: int) -> dict[str, float]:
    """Samples per wall second and per CPU second (all processes), over `batches` batches timed from when every
    worker has delivered its first batch. CPU seconds hold still on a machine shared with other jobs."""
    iterator = iter(loader)
    for _ in range(max(1, workers)):
        next(iterator)
    start, cpu_start = time.perf_counter(), _tree_cpu_seconds(os.getpid())
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - start, _tree_cpu_seconds(os.getpid()) - cpu_start
    return {"samples_per_second": batches * batch_size / wall, "samples_per_cpu_second": batches * batch_size / cpu}


def run_ours(pattern: str, args: argparse.Namespace) -> dict[str, float]:
    import torch
    from open_clip.tokenizer import SimpleTokenizer
    from torch.utils.data import DataLoader

    from contrastive.data.shards import expand_shards
    from contrastive.data.stream import ImageTextStream, Source, StreamLayout
    from contrastive.data.transforms import BatchNormalize, build_train_transform, train_decode_size

    torch.set_num_threads(1)
    tokenizer = SimpleTokenizer(context_length=77)
    layout = StreamLayout(rank=0, world_size=1, num_workers=max(1, args.workers), seed=0, resampled=True,
                          shuffle_buffer=args.shuffle_buffer)
    stream = ImageTextStream(
        [Source("bench", expand_shards(pattern), 1.0)], layout,
        build_train_transform(IMAGE_SIZE, crop_scale=(0.9, 1.0)),
        BatchNormalize(list(MEAN), list(STD)), tokenizer, IMAGE_SIZE, args.batch_size,
        decode_size=train_decode_size(IMAGE_SIZE, (0.9, 1.0)),
    )
    loader = DataLoader(stream, batch_size=None, num_workers=args.workers, persistent_workers=args.workers > 0,
                        prefetch_factor=4 if args.workers else None)
    return time_batches(loader, args.batches, args.workers, args.batch_size)


def run_reference(pattern: str, args: argparse.Namespace) -> dict[str, float]:
    import torch
    from open_clip import get_tokenizer
    from open_clip.transform import image_transform
    from open_clip_train.data import get_wds_dataset

    torch.set_num_threads(1)
    reference_args = argparse.Namespace(
        train_data=pattern, val_data=None, train_num_samples=10**7, dataset_resampled=True,
        train_data_upsampling_factors=None, batch_size=args.batch_size, workers=args.workers, world_size=1,
        rank=0, seed=0,
    )
    preprocess = image_transform(IMAGE_SIZE, is_train=True, mean=MEAN, std=STD)  # RandomResizedCrop(0.9, 1.0)
    data = get_wds_dataset(reference_args, preprocess, is_train=True, tokenizer=get_tokenizer("ViT-B-32"))
    return time_batches(data.dataloader, args.batches, args.workers, args.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards-dir", type=Path, default=Path(tempfile.gettempdir()) / "contrastive-bench-shards")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40, help="timed batches, after start-up")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each; medians are reported")
    parser.add_argument("--reference-python", default=sys.executable,
                        help="interpreter with open_clip_train and webdataset<=0.2.86 (see the docstring)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--run-reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    pattern = build_shards(args.shards_dir, args.samples, args.samples_per_shard)
    if args.run_reference:
        print(json.dumps(run_reference(pattern, args)))
        return

    command = [args.reference_python, __file__, "--run-reference", "--shards-dir", str(args.shards_dir),
               "--samples", str(args.samples), "--samples-per-shard", str(args.samples_per_shard),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--batches", str(args.batches),
               "--shuffle-buffer", str(args.shuffle_buffer)]
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    ours, reference = [], []
    for _ in range(args.rounds):  # alternate, so load from other jobs falls on both alike
        ours.append(run_ours(pattern, args))
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            sys.exit(f"reference run failed ({args.reference_python}):\n{result.stderr[-3000:]}")
        reference.append(json.loads(result.stdout.strip().splitlines()[-1]))
    figures = {"image_size": IMAGE_SIZE, "source_size": SOURCE_SIZE, "batch_size": args.batch_size,
               "workers": args.workers, "timed_batches": args.batches, "rounds": args.rounds, "target_ratio": 1.5}
    print(f"{'pipeline':<30}{'samples/s':>12}{'samples/CPU-s':>15}")
    for name, runs in (("ours", ours), ("open_clip", reference)):
        for measure in ("samples_per_second", "samples_per_cpu_second"):
            figures[f"{name}_{measure}"] = statistics.median(run[measure] for run in runs)
        label = "contrastive ImageTextStream" if name == "ours" else "open_clip get_wds_dataset"
        print(f"{label:<30}{figures[name + '_samples_per_second']:>12.1f}"
              f"{figures[name + '_samples_per_cpu_second']:>15.1f}")
    figures["ratio"] = figures["ours_samples_per_second"] / figures["open_clip_samples_per_second"]
    figures["cpu_ratio"] = figures["ours_samples_per_cpu_second"] / figures["open_clip_samples_per_cpu_second"]
    print(f"{'ratio (ours / open_clip)':<30}{figures['ratio']:>12.2f}{figures['cpu_ratio']:>15.2f}   target >= 1.5")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
