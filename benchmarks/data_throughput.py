"""Training-data throughput: our stream against open_clip's `open_clip_train.data.get_wds_dataset`, same run.

Two sets of shards, JPEGs with one-line captions:
  256px       what img2dataset writes by default (image_size=256, resize_mode=border, JPEG quality 95): photo-like
              pictures of random aspect, their longer side resized to 256 and centred on a black 256x256 square
  500-1000px  originals, each side drawn from 500-1000 px (quality 90)
Both pipelines make 224x224 random-resized crops (scale 0.9-1.0, bicubic), normalise, tokenize, and batch in the
same number of DataLoader workers with the same batch size. Ours yields uint8 batches that the trainer normalises on
its device; here that normalisation runs in the main process on the CPU, inside the timing. Reported: samples per
wall second and per CPU second of all processes (for ours also without the main process's normalisation, which a
GPU node's device does), timed after the first batch of every worker (start-up excluded),
medians over rounds that alternate ours and open_clip (which goes first alternates too), ours / open_clip per set,
and the load average before and after (the machine may be shared). Both pipelines run under the same host-memory
setting (--allocator): `reuse-freed` (the default) is what our trainer applies on CPU (trainer.reuse_freed_host_memory,
contrastive/train/host_memory.py: glibc serves every block from its heap and keeps freed ones, instead of fresh
mmap'd pages for each large block); ours gets it through that function, the reference through glibc's equivalent
environment variables (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_). `huge-pages` sets THP_MEM_ALLOC_ENABLE=1 for
both (torch backs blocks of 2 MB and more with transparent huge pages); `default` is glibc's and torch's default.

--profile prints where our per-sample time goes instead (one process, no workers): reading the tar, decoding,
the crop and resize, copying into the batch, tokenizing and normalising (per batch, shown per sample).
benchmarks/data_profile.py profiles open_clip's pipeline and ours before issue 18 beside ours, stage by stage.

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
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

from provenance import git_commit  # benchmarks/ is on the path: run as a script, or by the scripts importing this

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 224
CROP_SCALE = (0.9, 1.0)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TARGET_RATIO = 2.5  # on the 256px set (issue 18)
# --allocator -> environment of both pipelines (reuse-freed: ours also calls the trainer's reuse_freed_host_memory)
ALLOCATORS = {
    "reuse-freed": {"THP_MEM_ALLOC_ENABLE": "0", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)},
    "huge-pages": {"THP_MEM_ALLOC_ENABLE": "1"},
    "default": {"THP_MEM_ALLOC_ENABLE": "0"},
}
# name -> (samples, samples per shard, smallest and largest side of the original, img2dataset's 256 px border resize)
SETS = {"256px": (4096, 256, (200, 400), True), "500-1000px": (1024, 128, (500, 1000), False)}


def photo_like(rng, height: int, width: int):
    """Smooth colour gradients plus sensor-like noise: decodes and resizes like a photo, unlike a flat test card."""
    import numpy as np

    rows, columns = np.linspace(0, 160, height), np.linspace(0, 160, width)
    base = columns[None, :, None] + rows[::-1][:, None, None] * rng.random(3)[None, None, :]
    return np.clip(base * 0.8 + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def build_shards(root: Path, name: str, limit: int | None = None) -> str:
    """The set's shards under root/name (made once, then reused); returns their brace pattern. `limit`: only its
    first `limit` samples (the same images), in a folder of their own (a smoke run)."""
    import numpy as np
    from PIL import Image

    samples, per_shard, (low, high), border_256 = SETS[name]
    samples = samples if limit is None else min(samples, limit)
    directory = root / (name if limit is None else f"{name}-first{samples}")
    directory.mkdir(parents=True, exist_ok=True)
    shards = -(-samples // per_shard)
    pattern = str(directory / f"{{0..{shards - 1}}}.tar")
    if (directory / f"{shards - 1}.tar").exists():
        return pattern
    rng = np.random.default_rng(0)
    for shard in range(shards):
        with tarfile.open(directory / f"{shard}.tar", "w") as archive:
            for index in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                height, width = (int(side) for side in rng.integers(low, high + 1, size=2))
                image = Image.fromarray(photo_like(rng, height, width))
                if border_256:  # img2dataset's default: longer side to 256, centred on a black square
                    scale = 256 / max(height, width)
                    image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.LANCZOS)
                    square = Image.new("RGB", (256, 256))
                    square.paste(image, ((256 - image.width) // 2, (256 - image.height) // 2))
                    image = square
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=95 if border_256 else 90)
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


def time_batches(loader, batches: int, workers: int, batch_size: int, finish=None) -> dict:
    """Samples per wall second and per CPU second (all processes), over `batches` batches timed from when every
    worker has delivered its first batch. `finish` is what the consumer still does to a batch before the model, on
    the CPU here; its CPU time is also reported apart, for a device that would do it instead."""
    iterator = iter(loader)
    for _ in range(max(1, workers)):
        next(iterator)
    start, cpu_start, finish_cpu = time.perf_counter(), _tree_cpu_seconds(os.getpid()), 0.0
    for _ in range(batches):
        batch = next(iterator)
        if finish is not None:
            finish_start = time.thread_time()
            finish(batch)
            finish_cpu += time.thread_time() - finish_start
    wall, cpu = time.perf_counter() - start, _tree_cpu_seconds(os.getpid()) - cpu_start
    samples = batches * batch_size
    return {"samples_per_second": samples / wall, "samples_per_cpu_second": samples / cpu,
            "samples_per_cpu_second_finish_on_device": samples / (cpu - finish_cpu)}


def _our_parts():
    import torch
    from open_clip.tokenizer import SimpleTokenizer

    from contrastive.data.transforms import BatchNormalize, build_train_transform, train_decode_size

    torch.set_num_threads(1)
    return (build_train_transform(IMAGE_SIZE, crop_scale=CROP_SCALE), train_decode_size(IMAGE_SIZE, CROP_SCALE),
            BatchNormalize(list(MEAN), list(STD)), SimpleTokenizer(context_length=77))


def run_ours(pattern: str, args: argparse.Namespace) -> dict[str, float]:
    from contrastive.data.batch_memory import StreamLoader
    from contrastive.data.shards import expand_shards
    from contrastive.data.stream import ImageTextStream, Source, StreamLayout

    transform, decode_size, normalize, tokenizer = _our_parts()
    layout = StreamLayout(rank=0, world_size=1, num_workers=max(1, args.workers), seed=0, resampled=True,
                          shuffle_buffer=args.shuffle_buffer)
    stream = ImageTextStream([Source("bench", expand_shards(pattern), 1.0)], layout, transform, tokenizer,
                             IMAGE_SIZE, args.batch_size, decode_size=decode_size)
    loader = StreamLoader(stream, num_workers=args.workers)  # as contrastive.data.loader builds it
    return time_batches(loader, args.batches, args.workers, args.batch_size, normalize.batch)


def profile_ours(pattern: str, samples: int, batch_size: int) -> dict[str, float]:
    """Milliseconds per sample in each stage of our per-sample path, one process."""
    import torch

    from contrastive.data.reader import iter_shard
    from contrastive.data.shards import expand_shards
    from contrastive.data.transforms import decode_image

    transform, decode_size, normalize, tokenizer = _our_parts()
    seconds = dict.fromkeys(("read", "decode", "crop_resize", "collate", "tokenize", "normalize"), 0.0)
    generator = torch.Generator()
    images = torch.empty((batch_size, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    captions: list[str] = []
    raws = (raw for url in expand_shards(pattern) for raw in iter_shard(url, Counter()))
    for index in range(samples):
        start = time.perf_counter()
        raw = next(raws)
        decode_start = time.perf_counter()
        image = decode_image(raw["jpg"], decode_size, pixels=True)  # as the stream decodes
        crop_start = time.perf_counter()
        generator.manual_seed(index)
        crop = transform(image, generator)
        collate_start = time.perf_counter()
        images[index % batch_size] = crop
        captions.append(raw["txt"].decode())
        end = time.perf_counter()
        for stage, begun, ended in (("read", start, decode_start), ("decode", decode_start, crop_start),
                                    ("crop_resize", crop_start, collate_start), ("collate", collate_start, end)):
            seconds[stage] += ended - begun
        if len(captions) == batch_size:
            start = time.perf_counter()
            tokenizer(captions)
            middle = time.perf_counter()
            normalize(images)
            seconds["tokenize"] += middle - start
            seconds["normalize"] += time.perf_counter() - middle
            captions = []
    per_sample = {stage: 1000 * total / samples for stage, total in seconds.items()}
    per_sample["total"] = sum(per_sample.values())
    return per_sample


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
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=40, help="timed batches, after start-up")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7,
                        help="alternating runs of each; medians are reported (one run varies by up to 30%% on 2 vCPUs)")
    parser.add_argument("--profile", action="store_true", help="print our per-stage times instead (one process)")
    parser.add_argument("--profile-samples", type=int, default=512)
    parser.add_argument("--reference-python", default=sys.executable,
                        help="interpreter with open_clip_train and webdataset<=0.2.86 (see the docstring)")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="reuse-freed",
                        help="host-memory setting of both pipelines (see the docstring)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--run-reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # torch reads THP_MEM_ALLOC_ENABLE at its first allocation, so before anything here imports torch; glibc reads
    # its variables at start-up, so they reach the reference (a subprocess) only; the reference inherits them all
    os.environ.update(ALLOCATORS[args.allocator])
    if args.allocator == "reuse-freed" and not args.run_reference:
        sys.path.insert(0, str(REPO))
        from contrastive.train.host_memory import reuse_freed_host_memory

        if not reuse_freed_host_memory():
            sys.exit("--allocator reuse-freed needs glibc (mallopt)")
    patterns = {name: build_shards(args.shards_dir, name) for name in args.sets}
    if args.run_reference:
        print(json.dumps(run_reference(patterns[args.sets[0]], args)))
        return
    sys.path.insert(0, str(REPO))  # our code from this checkout, installed or not
    figures = {"commit": git_commit(), "command": shlex.join([sys.executable, *sys.argv]), "image_size": IMAGE_SIZE,
               "crop_scale": CROP_SCALE, "batch_size": args.batch_size, "workers": args.workers,
               "allocator": {"both_pipelines": args.allocator, "environment": ALLOCATORS[args.allocator]},
               "load_average_before": os.getloadavg(), "sets": {}}
    if args.profile:
        figures["profile_ms_per_sample"] = {
            name: profile_ours(pattern, args.profile_samples, args.batch_size) for name, pattern in patterns.items()}
        for name, stages in figures["profile_ms_per_sample"].items():
            print(f"{name:<12}" + "  ".join(f"{stage} {ms:.3f}" for stage, ms in stages.items()) + "  (ms/sample)")
    else:
        figures.update(timed_batches=args.batches, rounds=args.rounds, target_ratio_256px=TARGET_RATIO)
        env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
        runs = {name: {"ours": [], "open_clip": []} for name in args.sets}
        for round_index in range(args.rounds):  # alternate, so load from other jobs falls on both alike
            for name in args.sets:
                command = [args.reference_python, __file__, "--run-reference", "--sets", name,
                           "--shards-dir", str(args.shards_dir), "--batch-size", str(args.batch_size),
                           "--workers", str(args.workers), "--batches", str(args.batches),
                           "--shuffle-buffer", str(args.shuffle_buffer), "--allocator", args.allocator]
                for pipeline in (("ours", "open_clip") if round_index % 2 == 0 else ("open_clip", "ours")):
                    if pipeline == "ours":
                        runs[name]["ours"].append(run_ours(patterns[name], args))
                        continue
                    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
                    if result.returncode != 0:
                        sys.exit(f"reference run failed ({args.reference_python}):\n{result.stderr[-3000:]}")
                    runs[name]["open_clip"].append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"{'set':<12}{'pipeline':<12}{'samples/s':>12}{'samples/CPU-s':>15}")
        for name, pipelines in runs.items():
            entry = {"round_ratios": [ours["samples_per_second"] / reference["samples_per_second"]
                                      for ours, reference in zip(pipelines["ours"], pipelines["open_clip"])],
                     "runs": pipelines}
            for pipeline, measured in pipelines.items():
                for measure in ("samples_per_second", "samples_per_cpu_second"):
                    entry[f"{pipeline}_{measure}"] = statistics.median(run[measure] for run in measured)
                if pipeline == "ours":
                    entry["ours_samples_per_cpu_second_normalised_on_device"] = statistics.median(
                        run["samples_per_cpu_second_finish_on_device"] for run in measured)
                print(f"{name:<12}{pipeline:<12}{entry[pipeline + '_samples_per_second']:>12.1f}"
                      f"{entry[pipeline + '_samples_per_cpu_second']:>15.1f}")
            entry["ratio"] = entry["ours_samples_per_second"] / entry["open_clip_samples_per_second"]
            entry["cpu_ratio"] = entry["ours_samples_per_cpu_second"] / entry["open_clip_samples_per_cpu_second"]
            # the CPU work of a GPU node, where our uint8 batches are normalised on the device
            entry["cpu_ratio_normalised_on_device"] = (entry["ours_samples_per_cpu_second_normalised_on_device"]
                                                      / entry["open_clip_samples_per_cpu_second"])
            figures["sets"][name] = entry
            print(f"{name:<12}{'ours/open_clip':<12}{entry['ratio']:>12.2f}{entry['cpu_ratio']:>15.2f}"
                  f"   normalised on the device: {entry['cpu_ratio_normalised_on_device']:.2f} per CPU-s"
                  + (f"   target >= {TARGET_RATIO}" if name == "256px" else ""))
    figures["load_average_after"] = os.getloadavg()
    print(f"load average (1, 5, 15 min): before {figures['load_average_before']}, "
          f"after {figures['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
