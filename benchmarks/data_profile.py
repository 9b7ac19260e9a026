"""Where a training sample's time goes: a per-stage profile of three image paths, one process, one thread.

    python benchmarks/data_profile.py --json /tmp/data_profile.json

Stages, in microseconds per sample (per-batch stages divided by the batch size):
  read         the sample's bytes out of the tar shard (our reader for all three, so the stage is the same work)
  decode       JPEG -> RGB pixels
  crop_resize  the 224 px random-resized crop (scale 0.9-1.0, bicubic, antialiased), with its random draws
  normalise    to float, minus the mean, over the std
  tokenise     the caption (bytes -> str -> 77 token ids)
  collate      the batch assembled and copied into shared memory, which is how a DataLoader worker hands it over

Pipelines:
  open_clip        open_clip's training transform (RandomResizedCrop on the PIL image, then to tensor and Normalize
                   per sample), its tokenizer per sample, webdataset's "pilrgb" decode (load, convert to RGB) and
                   its batching (torch.stack), then the move into shared memory that sending a batch from a worker does
  before_issue_18  our path before issue 18 (commit 9b8f495^), reconstructed stage by stage here because no config
                   switch brings it back: draft decode and convert("RGB") always, pil_to_tensor (two copies out of
                   PIL), torchvision's resized_crop on planar uint8, the crop into a uint8 window, then normalised in
                   the worker into a float32 batch in shared memory; captions tokenised per batch. (Draft decoding
                   predates issue 18: the first commit has it.)
  current          this checkout's path, the functions the stream calls: decode_image, the train transform, the
                   crop written into the batch's shared memory (a worker's ring of buffers, each written again once
                   the main process has copied its batch out, that copy included), captions tokenised per batch. Its
                   normalisation runs on the trainer's device (BatchNormalize); here it is timed on the CPU and apart
                   (`sum_us_without_normalise` is the CPU work per sample of a GPU node's data workers).

All three run under the host-memory policy our trainer applies on CPU (contrastive/train/host_memory.py: freed
blocks are reused, not handed back to the kernel). Each pipeline also reports `measured_us`, the wall time of its
whole loop per sample; what the stages do not cover (the loop itself) is the difference. The shards are
benchmarks/data_throughput.py's 256 px and 500-1000 px sets.
A speed profile wants a quiet machine; this one only tells where the time goes.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # our code from this checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_throughput import CROP_SCALE, IMAGE_SIZE, MEAN, SETS, STD, build_shards
from provenance import git_commit

from contrastive.data.batch_memory import BatchMemory, ImageRing, shared_tensor
from contrastive.data.reader import iter_shard
from contrastive.data.shards import expand_shards
from contrastive.data.transforms import (
    BatchNormalize,
    build_train_transform,
    decode_image,
    train_decode_size,
)
from contrastive.train.host_memory import reuse_freed_host_memory

STAGES = ("read", "decode", "crop_resize", "normalise", "tokenise", "collate")


class StageClock:
    """Seconds spent per stage: `timed(stage, function, *args)` runs the function and books its time."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def timed(self, stage: str, function: Callable, *args):
        start = time.perf_counter()
        result = function(*args)
        self.seconds[stage] += time.perf_counter() - start
        return result


def _shared(*tensors: torch.Tensor) -> None:
    """What sending a batch from a DataLoader worker does to tensors not yet in shared memory: copies them there."""
    for tensor in tensors:
        tensor.share_memory_()


def _stack_shared(images: list[torch.Tensor], texts: list[torch.Tensor]) -> None:
    """webdataset's batching (torch.stack), then the move into shared memory."""
    _shared(torch.stack(images), torch.stack(texts))


def _caption(data: bytes) -> str:
    return data.decode("utf-8").strip()


# Each pipeline: (our tokenizer) -> run(raw samples, samples, batch size, clock), its parts built before the timing.
def _open_clip(_) -> Callable:
    from open_clip import get_tokenizer
    from open_clip.transform import image_transform

    preprocess = image_transform(IMAGE_SIZE, is_train=True, mean=MEAN, std=STD)
    crop, to_normalised = preprocess.transforms[0], preprocess.transforms[1:]  # RandomResizedCrop | rest
    tokenizer = get_tokenizer("ViT-B-32")

    def decode(data: bytes) -> Image.Image:  # webdataset's "pilrgb"
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")

    def normalise(image: Image.Image) -> torch.Tensor:
        for transform in to_normalised:
            image = transform(image)
        return image

    def run(raws, samples: int, batch_size: int, clock: StageClock) -> None:
        images, texts = [], []
        for _ in range(samples):
            raw = clock.timed("read", next, raws)
            image = clock.timed("decode", decode, raw["jpg"])
            image = clock.timed("normalise", normalise, clock.timed("crop_resize", crop, image))
            images.append(image)
            texts.append(clock.timed("tokenise", lambda text: tokenizer(text.decode("utf-8"))[0], raw["txt"]))
            if len(images) == batch_size:
                clock.timed("collate", _stack_shared, images, texts)
                images, texts = [], []

    return run


def _before_issue_18(tokenizer) -> Callable:
    from torchvision.transforms.v2 import functional

    transform = build_train_transform(IMAGE_SIZE, crop_scale=CROP_SCALE)  # its crop_box: the draws are unchanged
    decode_size = train_decode_size(IMAGE_SIZE, CROP_SCALE)
    shift, scale = torch.tensor(MEAN).view(1, 3, 1, 1) * 255, 1 / (torch.tensor(STD).view(1, 3, 1, 1) * 255)
    generator = torch.Generator()

    def decode(data: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (decode_size, decode_size))
        return image.convert("RGB")

    def crop_resize(image: Image.Image, seed: int) -> torch.Tensor:
        generator.manual_seed(seed)
        pixels = functional.pil_to_tensor(image)
        top, left, height, width = transform.crop_box(*pixels.shape[-2:], generator)
        return functional.resized_crop(pixels, top, left, height, width, [IMAGE_SIZE, IMAGE_SIZE],
                                       interpolation=transform.interpolation, antialias=True)

    def normalise(window: torch.Tensor) -> torch.Tensor:  # the old BatchNormalize, into the worker's shared batch
        out = shared_tensor(tuple(window.shape), torch.float32)
        return out.copy_(window).sub_(shift).mul_(scale)

    def run(raws, samples: int, batch_size: int, clock: StageClock) -> None:
        window = torch.empty((batch_size, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
        captions: list[str] = []
        for index in range(samples):
            raw = clock.timed("read", next, raws)
            image = clock.timed("decode", decode, raw["jpg"])
            crop = clock.timed("crop_resize", crop_resize, image, index)
            clock.timed("collate", window.__setitem__, len(captions), crop)
            captions.append(clock.timed("tokenise", _caption, raw["txt"]))
            if len(captions) == batch_size:
                clock.timed("normalise", normalise, window)
                tokens = clock.timed("tokenise", tokenizer, captions)
                clock.timed("collate", _shared, tokens)
                captions = []

    return run


def _current(tokenizer) -> Callable:
    transform = build_train_transform(IMAGE_SIZE, crop_scale=CROP_SCALE)
    decode_size = train_decode_size(IMAGE_SIZE, CROP_SCALE)
    normalize = BatchNormalize(list(MEAN), list(STD))
    generator = torch.Generator()

    def crop_resize(image: torch.Tensor, seed: int) -> torch.Tensor:
        generator.manual_seed(seed)
        return transform(image, generator)

    def run(raws, samples: int, batch_size: int, clock: StageClock) -> None:
        # the worker's ring of shared image buffers (contrastive.data.batch_memory), released batch by batch as the
        # main process's StreamLoader does once it has copied the images out (that copy is timed under collate)
        memory = BatchMemory(1, depth=6)
        ring = ImageRing(memory, 0, (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE))
        images, number = clock.timed("collate", ring.take)
        captions: list[str] = []
        for index in range(samples):
            raw = clock.timed("read", next, raws)
            image = clock.timed("decode", decode_image, raw["jpg"], decode_size, 1, True)  # as the stream does
            crop = clock.timed("crop_resize", crop_resize, image, index)
            clock.timed("collate", images.__setitem__, len(captions), crop)
            captions.append(clock.timed("tokenise", _caption, raw["txt"]))
            if len(captions) == batch_size:
                tokens = clock.timed("tokenise", tokenizer, captions)
                clock.timed("collate", _shared, tokens)
                owned = clock.timed("collate", images.clone)
                memory.release(0, number)
                clock.timed("normalise", normalize, owned)  # on the trainer's device in training
                images, number = clock.timed("collate", ring.take)
                captions = []

    return run


PIPELINES = {"open_clip": _open_clip, "before_issue_18": _before_issue_18, "current": _current}


def profile(pattern: str, pipeline: str, samples: int, batch_size: int) -> dict:
    """Microseconds per sample per stage of one pipeline over `samples` samples (whole batches) of a set."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=77)
    run = PIPELINES[pipeline](tokenizer)
    raws = (raw for url in expand_shards(pattern) for raw in iter_shard(url, Counter()))
    clock = StageClock()
    start = time.perf_counter()
    run(raws, samples, batch_size, clock)
    measured = time.perf_counter() - start
    stage_us = {stage: 1e6 * seconds / samples for stage, seconds in clock.seconds.items()}
    total = sum(stage_us.values())
    return {"stage_us": stage_us, "share": {stage: us / total for stage, us in stage_us.items()}, "sum_us": total,
            "sum_us_without_normalise": total - stage_us["normalise"], "measured_us": 1e6 * measured / samples}


def _print_table(name: str, results: dict) -> None:
    print(f"\n{name}: microseconds per sample (share of the stages' sum)")
    print(f"{'stage':<26}" + "".join(f"{pipeline:>22}" for pipeline in results))
    for stage in STAGES:
        print(f"{stage:<26}" + "".join(f"{r['stage_us'][stage]:>13.1f} ({r['share'][stage]:>5.1%})"
                                      for r in results.values()))
    for row in ("sum_us", "sum_us_without_normalise", "measured_us"):
        print(f"{row:<26}" + "".join(f"{r[row]:>13.1f}{'':9}" for r in results.values()))
    reference = results["open_clip"]["sum_us"]
    print(f"{'open_clip sum / sum':<26}" + "".join(f"{reference / r['sum_us']:>13.2f}x{'':8}"
                                                   for r in results.values()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards-dir", type=Path, default=Path(tempfile.gettempdir()) / "contrastive-bench-shards")
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--samples", type=int, default=1024, help="profiled samples per set and pipeline")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit-shards", action="store_true",
                        help="build only the shards the profiled samples need (a smoke run)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.samples < args.batch_size or args.samples % args.batch_size:
        parser.error("--samples must be a positive multiple of --batch-size (the profile times whole batches)")
    torch.set_num_threads(1)  # one thread for every pipeline, so the profile is like for like
    reuse_freed_host_memory()  # and the host-memory policy our trainer applies on CPU, for every pipeline
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    figures = {"commit": git_commit(), "command": command,
               "samples": args.samples, "batch_size": args.batch_size, "threads": 1,
               "image_size": IMAGE_SIZE, "crop_scale": CROP_SCALE, "sets": {}}
    for name in args.sets:
        pattern = build_shards(args.shards_dir, name, limit=args.samples if args.limit_shards else None)
        results = {pipeline: profile(pattern, pipeline, args.samples, args.batch_size) for pipeline in PIPELINES}
        figures["sets"][name] = results
        _print_table(name, results)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
