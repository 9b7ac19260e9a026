"""data.decode_device=cuda against the CPU workers' path, same run: images/s into the model's input and the pixel bound.

    python benchmarks/device_decode.py --device cuda --json /tmp/device_decode.json

Both arms read benchmarks/data_throughput.py's 256 px set through the training stream in the same number of
DataLoader workers, and do what the trainer does with each batch: pinned uint8 batches copied to the device without
waiting, then (device arm) the JPEGs decoded, cropped and resized there (transforms.decode_on_device), then
normalised (BatchNormalize). Timed after every worker's first batch, to the device's synchronize; reported:
images/s of each arm and their ratio (device / CPU workers).

The pixel bound: the first batch of each arm from the same seed, in this process, the device arm decoded on
--device: the same samples, and a mean absolute error (0-255 grey levels) under --max-mae against the CPU path (on
CPU, tests/test_device_decode.py measures 0.21 at 256 px). A figure missing or above the bound exits non-zero.
make gpu-check runs this script (benchmarks/gpu_check_parts.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our code from this checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_throughput import CROP_SCALE, IMAGE_SIZE, MEAN, STD, build_shards
from provenance import git_commit

from contrastive.data.shards import expand_shards
from contrastive.data.stream import ImageTextStream, Source, StreamLayout
from contrastive.data.transforms import (
    BatchNormalize,
    DeviceJpegCrop,
    build_train_transform,
    decode_on_device,
    train_decode_size,
)

SET = "256px"


def _stream(pattern: str, batch_size: int, workers: int, on_device: bool) -> ImageTextStream:
    from open_clip.tokenizer import SimpleTokenizer

    transform = build_train_transform(IMAGE_SIZE, crop_scale=CROP_SCALE)
    decode_size = train_decode_size(IMAGE_SIZE, CROP_SCALE)
    layout = StreamLayout(rank=0, world_size=1, num_workers=max(1, workers), seed=0, resampled=True,
                          shuffle_buffer=256)
    return ImageTextStream([Source("bench", expand_shards(pattern), 1.0)], layout, transform,
                           SimpleTokenizer(context_length=77), IMAGE_SIZE, batch_size, decode_size=decode_size,
                           device_jpeg=DeviceJpegCrop(transform, decode_size) if on_device else None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(pattern: str, args: argparse.Namespace, device: torch.device, on_device: bool) -> float:
    """The trainer's path from the loader to normalised images on `device`, per wall second."""
    normalize = BatchNormalize(list(MEAN), list(STD))
    loader = DataLoader(_stream(pattern, args.batch_size, args.workers, on_device), batch_size=None,
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if args.workers else None, persistent_workers=args.workers > 0)

    def to_model_input(batch):
        batch = batch.to(device, non_blocking=True)
        if batch.jpeg_bytes:
            batch = decode_on_device(batch, "bicubic", device)
        return normalize.batch(batch).images

    batches = iter(loader)
    for _ in range(max(1, args.workers)):  # start-up excluded: every worker has delivered once
        to_model_input(next(batches))
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(args.batches):
        to_model_input(next(batches))
    _synchronize(device)
    return args.batches * args.batch_size / (time.perf_counter() - start)


def pixel_error(pattern: str, batch_size: int, device: torch.device) -> float:
    """Mean absolute error of the device arm's first batch against the CPU path's, same seed and samples."""
    cpu = next(iter(_stream(pattern, batch_size, 0, on_device=False)))
    sent = next(iter(_stream(pattern, batch_size, 0, on_device=True)))
    if sent.keys != cpu.keys:
        sys.exit(f"the two arms drew different samples: {sent.keys[:3]} against {cpu.keys[:3]}")
    decoded = decode_on_device(sent.to(device), "bicubic", device).images.cpu()
    return float((decoded.float() - cpu.images.float()).abs().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shards-dir", type=Path, default=Path(tempfile.gettempdir()) / "contrastive-bench-shards")
    parser.add_argument("--samples", type=int, default=None, help="use only the set's first samples (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per arm")
    parser.add_argument("--max-mae", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    figures = {"commit": git_commit(), "command": shlex.join([sys.executable, *sys.argv]), "device": args.device,
               "set": SET, "batch_size": args.batch_size, "workers": args.workers, "timed_batches": args.batches}
    pattern = build_shards(args.shards_dir, SET, limit=args.samples)
    figures["mae"] = pixel_error(pattern, min(args.batch_size, 64), device)
    figures["max_mae"] = args.max_mae
    figures["cpu_workers_images_per_second"] = images_per_second(pattern, args, device, on_device=False)
    figures["device_decode_images_per_second"] = images_per_second(pattern, args, device, on_device=True)
    figures["ratio"] = figures["device_decode_images_per_second"] / figures["cpu_workers_images_per_second"]
    print(f"{SET} on {args.device}, {args.workers} workers, batch {args.batch_size}: CPU workers "
          f"{figures['cpu_workers_images_per_second']:.0f} images/s, decoded on the device "
          f"{figures['device_decode_images_per_second']:.0f} images/s ({figures['ratio']:.2f}x); "
          f"MAE {figures['mae']:.3f} (bound {args.max_mae})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if figures["mae"] >= args.max_mae:
        sys.exit(f"device decode MAE {figures['mae']:.3f} is not under {args.max_mae}")


if __name__ == "__main__":
    main()
