"""Deduplication: exact copies by image content hash, near copies by image embedding through a faiss HNSW
index, and removal of training samples that copy an evaluation set's images.

Two embeddings, both flip-invariant (an image's plus its mirror image's, normalised): by default a 16x16
greyscale thumbnail with its mean removed (Torralba's "tiny images", a copy descriptor that needs no model), or
with an encoder its image embedding. A semantic encoder maps same-class look-alikes close together, which is what
copy detection must not do; the thumbnail tells them apart on the demo set (tests/test_curation_dedup.py). The
similarity threshold is chosen on planted copies: training images copied here with the transformations web
copies carry (re-encoded, resized, cropped, flipped), scored against their sources (planted pairs) and against
every other image's nearest neighbours (unplanted pairs, where same-class look-alikes sit). The threshold with
the most recall at 99% precision is used; its precision, recall and false-positive rate on unplanted pairs are
reported.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from contrastive.curation.extra import require
from contrastive.curation.filtering import Selection, shard_id
from contrastive.curation.scoring import image_bytes
from contrastive.data.reader import iter_shard
from contrastive.data.transforms import BadSample, decode_image
from contrastive.encoders import LoadedEncoder
from contrastive.errors import ConfigError, InputError

TRANSFORMS = ("reencoded", "resized", "cropped", "flipped")
NEIGHBOURS = 10  # nearest neighbours looked at per image; pairs further away are below any useful threshold


@dataclass
class Embedded:
    """Images of a shard set: where each is, its content hash and its flip-invariant embedding (N, D)."""

    ids: list[tuple[str, str]] = field(default_factory=list)  # (shard, key)
    hashes: list[str] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    skipped: Counter = field(default_factory=Counter)


Embed = Callable[[list[Image.Image]], np.ndarray]  # images -> (N, D) float32, L2-normalised
THUMBNAIL_SIZE = 16


def thumbnail_embedding(images: list[Image.Image]) -> np.ndarray:
    """(N, 256): each image as a 16x16 greyscale thumbnail plus its mirror, mean removed, L2-normalised."""
    rows = []
    for image in images:
        pixels = np.asarray(image.convert("L").resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BOX),
                            dtype=np.float32)
        pixels = pixels + pixels[:, ::-1]
        pixels = pixels - pixels.mean()
        rows.append(pixels.ravel() / max(float(np.linalg.norm(pixels)), 1e-6))
    return np.stack(rows) if rows else np.zeros((0, THUMBNAIL_SIZE * THUMBNAIL_SIZE), dtype=np.float32)


def encoder_embedding(encoder: LoadedEncoder, batch_size: int = 256) -> Embed:
    return lambda images: embed_images(images, encoder, batch_size)


@torch.no_grad()
def embed_images(images: list[Image.Image], encoder: LoadedEncoder, batch_size: int = 256) -> np.ndarray:
    """(N, D) float32, L2-normalised: embedding(image) + embedding(mirror image), normalised."""
    transform = encoder.preprocess.transform()
    device = next(encoder.model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image) for image in images[start:start + batch_size]]).to(device)
        features = encoder.model.encode_image(batch).float() + encoder.model.encode_image(batch.flip(-1)).float()
        out.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)


def embed_shards(urls: list[str], embed: Embed, batch_size: int = 256, progress: bool = True,
                 keep_images: int = 0, min_image_size: int = 8) -> tuple[Embedded, list[Image.Image]]:
    """Hash and embed every image; also return the first `keep_images` decoded images (for planting copies)."""
    result, pending, kept_images = Embedded(), [], []
    parts = []
    for url in tqdm(urls, desc="embedding", unit="shard", disable=not progress):
        for sample in iter_shard(url, result.skipped):
            try:
                data = image_bytes(sample)
                image = decode_image(data, 256, min_image_size)
            except BadSample as bad:
                result.skipped[bad.reason] += 1
                continue
            result.ids.append((shard_id(url), sample["__key__"]))
            result.hashes.append(hashlib.sha256(data).hexdigest())
            pending.append(image)
            if len(kept_images) < keep_images:
                kept_images.append(image)
            if len(pending) == batch_size:
                parts.append(embed(pending))
                pending = []
    if pending:
        parts.append(embed(pending))
    result.embeddings = np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.float32)
    return result, kept_images


def transformed_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A copy of `image` as the web makes them: JPEG re-encoded at quality 30-70, resized by 0.6-1.6, cropped to
    90-95% of each side, or mirrored."""
    if kind == "reencoded":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(30, 71)))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "resized":
        scale = float(rng.uniform(0.6, 1.6))
        return image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))),
                            Image.Resampling.BICUBIC)
    if kind == "cropped":
        fraction = float(rng.uniform(0.9, 0.95))
        width, height = round(image.width * fraction), round(image.height * fraction)
        left = int(rng.integers(0, image.width - width + 1))
        top = int(rng.integers(0, image.height - height + 1))
        return image.crop((left, top, left + width, top + height))
    if kind == "flipped":
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    raise ValueError(f"unknown transformation {kind!r}")


def build_index(embeddings: np.ndarray):
    """An HNSW inner-product index (cosine on normalised embeddings): approximate, sublinear per query."""
    faiss = require("faiss")
    index = faiss.IndexHNSWFlat(embeddings.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 64
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


def neighbour_pairs(index, embeddings: np.ndarray, k: int = NEIGHBOURS) -> dict[tuple[int, int], float]:
    """(i, j) with i < j -> similarity, for each image's k nearest other images."""
    similarities, neighbours = index.search(np.ascontiguousarray(embeddings, dtype=np.float32), k + 1)
    pairs = {}
    for i, (row_sims, row_ids) in enumerate(zip(similarities, neighbours)):
        for similarity, j in zip(row_sims, row_ids):
            if j >= 0 and j != i:
                pairs[(min(i, int(j)), max(i, int(j)))] = float(similarity)
    return pairs


@dataclass
class Calibration:
    threshold: float
    precision: float
    recall: float
    false_positive_rate: float  # unplanted pairs at or above the threshold / all unplanted pairs
    planted: int
    recall_by_transform: dict[str, float]

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def calibrate(images: list[Image.Image], embedded: Embedded, index, embed: Embed, seed: int = 0,
              exclude: set[int] | None = None, target_precision: float = 0.99) -> Calibration:
    """Plant one transformed copy of each of `images` (the first len(images) of `embedded`, cycling through
    TRANSFORMS) and pick the lowest threshold at which planted pairs (copy, source) are told from unplanted pairs
    (nearest neighbours among the originals that are not exact copies, and each copy's nearest non-source) with
    `target_precision`: a look-alike taken for a copy costs a good sample, a missed copy only a repeat."""
    rng = np.random.default_rng(seed)
    kinds = [TRANSFORMS[i % len(TRANSFORMS)] for i in range(len(images))]
    copies = np.ascontiguousarray(embed([transformed_copy(image, kind, rng) for image, kind in zip(images, kinds)]),
                                  dtype=np.float32)
    planted = np.einsum("nd,nd->n", copies, embedded.embeddings[:len(images)])
    exact = exclude or set()
    unplanted = [s for (i, j), s in neighbour_pairs(index, embedded.embeddings).items()
                 if embedded.hashes[i] != embedded.hashes[j] and i not in exact and j not in exact]
    similarities, neighbours = index.search(copies, NEIGHBOURS)
    for source, (row_sims, row_ids) in enumerate(zip(similarities, neighbours)):
        unplanted += [float(s) for s, j in zip(row_sims, row_ids)
                      if j >= 0 and j != source and embedded.hashes[j] != embedded.hashes[source]]
    unplanted = np.asarray(unplanted)
    best = None
    for threshold in np.unique(np.concatenate([planted, unplanted])):
        true_positives = int((planted >= threshold).sum())
        false_positives = int((unplanted >= threshold).sum())
        if true_positives == 0:
            continue
        precision, recall = true_positives / (true_positives + false_positives), true_positives / len(planted)
        # The most recall at the target precision; below it, precision first (ties to the higher threshold).
        rank = (precision >= target_precision, recall if precision >= target_precision else precision)
        if best is None or rank >= best[0]:
            best = (rank, float(threshold), precision, recall, false_positives)
    _, threshold, precision, recall, false_positives = best
    n = len(embedded.ids)
    all_unplanted = n * (n - 1) // 2 + len(images) * (n - 1)
    by_kind = {kind: float(np.mean([p >= threshold for p, k in zip(planted, kinds) if k == kind]))
               for kind in TRANSFORMS if kind in kinds}
    return Calibration(threshold, precision, recall, false_positives / all_unplanted, len(images), by_kind)


def exact_duplicates(hashes: list[str]) -> set[int]:
    """Indices whose image bytes already appeared earlier (the first occurrence is kept)."""
    seen, duplicates = set(), set()
    for index, digest in enumerate(hashes):
        if digest in seen:
            duplicates.add(index)
        seen.add(digest)
    return duplicates


def near_duplicates(index, embeddings: np.ndarray, threshold: float, exclude: set[int]) -> set[int]:
    """j for every neighbour pair (i, j), i < j, at or above the threshold: the earlier image is kept."""
    return {j for (i, j), similarity in neighbour_pairs(index, embeddings).items()
            if similarity >= threshold and i not in exclude and j not in exclude}


def eval_leaks(index, train: Embedded, evaluation: Embedded, threshold: float) -> set[int]:
    """Training images that copy an evaluation image: the same bytes, or an embedding at or above the threshold."""
    eval_hashes = set(evaluation.hashes)
    leaks = {i for i, digest in enumerate(train.hashes) if digest in eval_hashes}
    similarities, neighbours = index.search(np.ascontiguousarray(evaluation.embeddings), NEIGHBOURS)
    leaks |= {int(j) for row_sims, row_ids in zip(similarities, neighbours)
              for s, j in zip(row_sims, row_ids) if j >= 0 and s >= threshold}
    return leaks


def deduplicate(urls: list[str], embed: Embed, *, eval_urls: list[str] | None, threshold: float | None,
                calibration_samples: int, seed: int = 0, progress: bool = True) -> tuple[Selection, dict]:
    """Which samples survive exact, near and evaluation-set deduplication, and the report: the threshold and,
    when it was calibrated here, its precision, recall and false-positive rate on planted copies."""
    train, images = embed_shards(urls, embed, progress=progress, keep_images=calibration_samples)
    if not train.ids:
        raise InputError("the shards hold no readable images")
    index = build_index(train.embeddings)
    exact = exact_duplicates(train.hashes)
    report: dict = {"images": len(train.ids), "skipped": dict(train.skipped)}
    if threshold is None:
        if len(images) < len(TRANSFORMS):
            raise ConfigError(f"--calibration-samples must be at least {len(TRANSFORMS)}, or give --threshold")
        calibration = calibrate(images, train, index, embed, seed, exclude=exact)
        threshold = calibration.threshold
        report["calibration"] = calibration.to_dict()
    report["threshold"] = threshold
    near = near_duplicates(index, train.embeddings, threshold, exact) - exact
    leaks: set[int] = set()
    if eval_urls:
        evaluation, _ = embed_shards(eval_urls, embed, progress=progress)
        leaks = eval_leaks(index, train, evaluation, threshold) - exact - near
        report["eval_images"] = len(evaluation.ids)
    dropped = exact | near | leaks
    rules = [{"rule": "exact duplicate (same image bytes as an earlier sample)", "dropped": len(exact)},
             {"rule": f"near duplicate of an earlier sample (similarity >= {threshold:.6f})", "dropped": len(near)}]
    if eval_urls:
        rules.append({"rule": "copies an evaluation image", "dropped": len(leaks)})
    kept = {sample: {} for index_, sample in enumerate(train.ids) if index_ not in dropped}
    return Selection(kept, len(train.ids), rules), report
