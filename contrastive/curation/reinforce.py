"""`reinforce`: run the teachers once over a data set and write it again with their outputs (MobileCLIP's reinforced
data sets; the per-sample format is contrastive.data.reinforced).

Each sample gets K random augmentations (crop box and flip, drawn on the stored image's size from a generator
seeded by the run's seed and the sample's key, so a rerun draws the same ones); every teacher embeds each
augmentation, cut at its own resolution, and the caption. JPEGs are decoded as the training stream decodes them: at
a reduced DCT scale (draft mode) where every box keeps the largest teacher's resolution across, the boxes scaled to
the decoded image (transforms.scale_crop), so a stored augmentation replayed on the same decode gives the same
pixels. Output shards keep their input names; each is written under a temporary name and renamed when whole, so a
killed run resumes by skipping the shards that exist. Under torchrun each rank takes every world_size-th shard;
ranks meet only at the end, where rank 0 writes `reinforce.json` (the teachers and their hashes, the options, and
the size overhead).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from contrastive.data.reader import iter_shard
from contrastive.data.reinforced import MANIFEST, TEACHER_NAME, StoredTargets, encode_sample_files
from contrastive.data.transforms import (
    IMAGE_EXTENSIONS,
    BadSample,
    CropParams,
    RandomCropFlip,
    apply_crop,
    decode_image,
    scale_crop,
    stored_decode_size,
    teacher_input,
)
from contrastive.encoders import LoadedEncoder, weights_hash
from contrastive.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReinforceOptions:
    augmentations: int = 4  # K per sample
    crop_scale: tuple[float, float] = (0.9, 1.0)
    horizontal_flip: bool = False
    seed: int = 0
    dtype: str = "float16"
    batch_size: int = 256  # teacher inputs per forward


def sample_generator(seed: int, key: str) -> torch.Generator:
    """The generator a sample's augmentations are drawn from: the same for the same seed and key, on any rank."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def draw_augmentations(height: int, width: int, key: str, options: ReinforceOptions) -> list[CropParams]:
    crop = RandomCropFlip(1, "bilinear", options.crop_scale, options.horizontal_flip)  # only its draws are used
    generator = sample_generator(options.seed, key)
    return [crop.draw(height, width, generator) for _ in range(options.augmentations)]


@torch.no_grad()
def embed_views(encoder: LoadedEncoder, pixels: list[torch.Tensor], source_sizes: list[tuple[int, int]],
                augmentations: list[list[CropParams]], device: torch.device, batch_size: int) -> list[np.ndarray]:
    """Per sample, (K, D) the teacher's L2-normalised embeddings of its augmentations (boxes in the stored image's
    pixels, `pixels` as decoded)."""
    preprocess = encoder.preprocess
    views = [apply_crop(image, scale_crop(params, source_size, tuple(image.shape[-2:])), preprocess.image_size,
                        preprocess.interpolation)
             for image, source_size, sample_augmentations in zip(pixels, source_sizes, augmentations)
             for params in sample_augmentations]
    features = []
    for start in range(0, len(views), batch_size):
        batch = teacher_input(torch.stack(views[start:start + batch_size]).to(device), preprocess)
        features.append(encoder.model.encode_image(batch).float().cpu())
    flat = torch.cat(features).numpy()
    counts = np.cumsum([len(a) for a in augmentations])[:-1]
    return np.split(flat, counts)


@torch.no_grad()
def embed_texts(encoder: LoadedEncoder, captions: list[str], device: torch.device, batch_size: int) -> np.ndarray:
    rows = [encoder.model.encode_text(encoder.tokenizer(captions[start:start + batch_size]).to(device)).float().cpu()
            for start in range(0, len(captions), batch_size)]
    return torch.cat(rows).numpy()


def _decoded(raw: dict, key: str, size: int,
             options: ReinforceOptions) -> tuple[torch.Tensor, tuple[int, int], list[CropParams], str]:
    """(uint8 (3, h, w) as decoded for crops of `size` pixels across, the stored image's (height, width), the
    augmentations drawn on it, the caption), or BadSample as training would count it."""
    data = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if data is None:
        raise BadSample("missing_image")
    if "txt" not in raw:
        raise BadSample("missing_caption")
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise BadSample("bad_caption_encoding", str(error)) from error
    if not caption:
        raise BadSample("empty_caption")
    try:
        width, height = Image.open(io.BytesIO(data)).size  # the header alone: no pixels decoded yet
    except Exception as error:  # PIL raises many types for bad bytes
        raise BadSample("corrupt_image", str(error)) from error
    augmentations = draw_augmentations(height, width, key, options)
    pixels = decode_image(data, stored_decode_size(augmentations, (height, width), size), pixels=True)
    return pixels, (height, width), augmentations, caption


def reinforce_shard(url: str, teachers: dict[str, LoadedEncoder], destination: Path, device: torch.device,
                    options: ReinforceOptions) -> tuple[int, Counter]:
    """Write `destination` (a whole tar, renamed into place at the end): every good sample of `url` with its
    reinforcement. Returns (samples written, skip counts)."""
    skipped: Counter = Counter()
    samples, pixels, source_sizes, captions, augmentations = [], [], [], [], []
    largest = max(encoder.preprocess.image_size for encoder in teachers.values())
    for raw in iter_shard(url, skipped):
        try:
            image, source_size, sample_augmentations, caption = _decoded(raw, str(raw["__key__"]), largest, options)
        except BadSample as bad:
            skipped[bad.reason] += 1
            continue
        samples.append(raw)
        pixels.append(image)
        source_sizes.append(source_size)
        captions.append(caption)
        augmentations.append(sample_augmentations)
    embeddings = {name: embed_views(encoder, pixels, source_sizes, augmentations, device, options.batch_size)
                  for name, encoder in teachers.items()}
    texts = {name: embed_texts(encoder, captions, device, options.batch_size) if encoder.has_text_tower else None
             for name, encoder in teachers.items()}
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as archive:
        for index, raw in enumerate(samples):
            targets = StoredTargets.of(
                source_sizes[index], augmentations[index],
                image_embeddings={name: embeddings[name][index] for name in teachers},
                text_embeddings={name: None if texts[name] is None else texts[name][index] for name in teachers},
                logit_scales={name: encoder.logit_scale for name, encoder in teachers.items()},
                logit_biases={name: encoder.logit_bias for name, encoder in teachers.items()})
            files = {ext: data for ext, data in raw.items() if not ext.startswith("__")}
            files.update(encode_sample_files(targets, options.dtype))
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{raw['__key__']}.{extension}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                archive.addfile(info, io.BytesIO(data))
    os.replace(temporary, destination)
    return len(samples), skipped


def output_path(out: Path, url: str) -> Path:
    return out / url.rstrip("/").rsplit("/", 1)[-1]


def reinforce_shards(urls: list[str], teachers: dict[str, LoadedEncoder], out: Path, *, rank: int, world_size: int,
                     barrier, device: torch.device, options: ReinforceOptions) -> dict:
    """This rank's shards (those not yet written), then on rank 0 the manifest. Returns this rank's counts."""
    for name in teachers:
        if not TEACHER_NAME.fullmatch(name):
            raise ConfigError(f"teacher name {name!r} may hold only letters, digits, '_' and '-' (it names files)")
    if len({output_path(out, url).name for url in urls}) < len(urls):
        raise ConfigError("the shards' file names repeat: reinforce writes each under its own name in --out")
    out.mkdir(parents=True, exist_ok=True)
    mine = urls[rank::world_size]
    todo = [url for url in mine if not output_path(out, url).exists()]
    if len(todo) < len(mine):
        log.info("rank %d: %d of its %d shards already written, resuming", rank, len(mine) - len(todo), len(mine))
    written, skipped, started = 0, Counter(), time.perf_counter()
    for number, url in enumerate(todo, 1):
        count, shard_skips = reinforce_shard(url, teachers, output_path(out, url), device, options)
        written += count
        skipped.update(shard_skips)
        log.info("rank %d: %d/%d shards, %d samples, %.1f samples/s", rank, number, len(todo), written,
                 written / max(time.perf_counter() - started, 1e-9))
    barrier()
    if rank == 0:
        write_manifest(urls, teachers, out, options)
    barrier()
    return {"written": len(todo), "resumed": len(mine) - len(todo), "samples": written, "skipped": skipped}


def write_manifest(urls: list[str], teachers: dict[str, LoadedEncoder], out: Path, options: ReinforceOptions) -> dict:
    input_bytes = sum(os.path.getsize(url) for url in urls)
    output_bytes = sum(output_path(out, url).stat().st_size for url in urls)
    manifest = {
        "teachers": {name: {"source": encoder.source, "sha256": weights_hash(encoder.model),
                            "image_size": encoder.preprocess.image_size} for name, encoder in teachers.items()},
        "augmentations": options.augmentations, "crop_scale": list(options.crop_scale),
        "horizontal_flip": options.horizontal_flip, "seed": options.seed, "dtype": options.dtype,
        "shards": len(urls), "input_bytes": input_bytes, "output_bytes": output_bytes,
        "size_overhead": output_bytes / input_bytes - 1,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
