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

Evaluation images are searched by crop views: each is queried as itself and as 27 crops (90, 92.5 and 95% of each
side, at 9 positions), a pair scoring its best view. A training copy cropped from a test image lines up with one of
the views, where against the whole image it is off in scale and position as far as a look-alike is. This search has
a threshold of its own, calibrated on the same planted copies against their sources' views, with the views'
nearest training neighbours as unplanted pairs, and set so that none of those is above it. It costs 28
embeddings per evaluation image.
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
    """(N, 256): each image as a 16x16 greyscale thumbnail plus its mirror, mean removed, L2-normalised. The
    mirror image is shrunk on its own: PIL's box filter at a fractional ratio (28 -> 16 px) does not commute with
    mirroring, so mirroring the thumbnail alone left a flipped copy at 0.97-0.998 of its source."""
    rows = []
    for image in images:
        grey = image.convert("L")
        pixels = _thumbnail(grey) + _thumbnail(grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT))[:, ::-1]
        pixels = pixels + pixels[:, ::-1]  # the sum above mirrors with its image; this makes it mirror-invariant
        pixels = pixels - pixels.mean()
        rows.append(pixels.ravel() / max(float(np.linalg.norm(pixels)), 1e-6))
    return np.stack(rows) if rows else np.zeros((0, THUMBNAIL_SIZE * THUMBNAIL_SIZE), dtype=np.float32)


def _thumbnail(image: Image.Image) -> np.ndarray:
    return np.asarray(image.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BOX), dtype=np.float32)


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


def iter_images(urls: list[str], skipped: Counter, progress: bool, min_image_size: int = 8):
    """(shard, key), sha256 of the image bytes, decoded image; bad samples counted in `skipped`."""
    for url in tqdm(urls, desc="embedding", unit="shard", disable=not progress):
        for sample in iter_shard(url, skipped):
            try:
                data = image_bytes(sample)
                image = decode_image(data, 256, min_image_size)
            except BadSample as bad:
                skipped[bad.reason] += 1
                continue
            yield (shard_id(url), sample["__key__"]), hashlib.sha256(data).hexdigest(), image


def embed_shards(urls: list[str], embed: Embed, batch_size: int = 256, progress: bool = True,
                 keep_images: int = 0, min_image_size: int = 8) -> tuple[Embedded, list[Image.Image]]:
    """Hash and embed every image; also return the first `keep_images` decoded images (for planting copies)."""
    result, pending, kept_images = Embedded(), [], []
    parts = []
    for sample_id, digest, image in iter_images(urls, result.skipped, progress, min_image_size):
        result.ids.append(sample_id)
        result.hashes.append(digest)
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


# The crop-view search picks each pair's best of 28 views, which lifts look-alikes too: its threshold admits no
# unplanted calibration pair (on the demo set, 3 of 128 look-alikes removed against 9 at 99% precision).
EVAL_TARGET_PRECISION = 1.0
CROP_FRACTIONS = (0.9, 0.925, 0.95)  # of each side: the crops transformed_copy plants span 90-95%
CROP_POSITIONS = (0.0, 0.5, 1.0)  # where a crop sits along each axis, as a fraction of the room left


def crop_views(image: Image.Image) -> list[Image.Image]:
    """The image and its crops to each of CROP_FRACTIONS of each side at CROP_POSITIONS: 28 views."""
    views = [image]
    for fraction in CROP_FRACTIONS:
        width, height = max(1, round(image.width * fraction)), max(1, round(image.height * fraction))
        for y in CROP_POSITIONS:
            for x in CROP_POSITIONS:
                left, top = round((image.width - width) * x), round((image.height - height) * y)
                views.append(image.crop((left, top, left + width, top + height)))
    return views


def embed_views(images: list[Image.Image], embed: Embed) -> np.ndarray:
    """(N, V, D): every image's crop views embedded."""
    views = [view for image in images for view in crop_views(image)]
    embedded = np.ascontiguousarray(embed(views), dtype=np.float32)
    return embedded.reshape(len(images), len(views) // len(images), embedded.shape[-1])


def search_views(index, views: np.ndarray, k: int = NEIGHBOURS) -> list[dict[int, float]]:
    """Per image of `views` (N, V, D): indexed neighbour -> its best similarity over the image's views (each
    view's k nearest)."""
    similarities, neighbours = index.search(views.reshape(-1, views.shape[-1]), k)
    best: list[dict[int, float]] = [{} for _ in range(len(views))]
    for row, (row_sims, row_ids) in enumerate(zip(similarities, neighbours)):
        found = best[row // views.shape[1]]
        for similarity, j in zip(row_sims, row_ids):
            if j >= 0 and similarity > found.get(int(j), -np.inf):
                found[int(j)] = float(similarity)
    return best


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
    n = len(embedded.ids)
    return choose_threshold(planted, np.asarray(unplanted), kinds, n * (n - 1) // 2 + len(images) * (n - 1),
                            target_precision)


def calibrate_views(images: list[Image.Image], embedded: Embedded, index, embed: Embed, seed: int = 0,
                    exclude: set[int] | None = None, target_precision: float = 0.99) -> Calibration:
    """The threshold for searching by crop views: the same planted copies as `calibrate` (same seed), each scored
    by its source's best view (planted pairs), and every source's views against their nearest training images
    other than the source and its exact copies (unplanted pairs)."""
    rng = np.random.default_rng(seed)
    kinds = [TRANSFORMS[i % len(TRANSFORMS)] for i in range(len(images))]
    copies = np.ascontiguousarray(embed([transformed_copy(image, kind, rng) for image, kind in zip(images, kinds)]),
                                  dtype=np.float32)
    views = embed_views(images, embed)
    planted = np.einsum("nvd,nd->nv", views, copies).max(axis=1)
    exact = exclude or set()
    unplanted = [similarity for source, found in enumerate(search_views(index, views)) for j, similarity
                 in found.items() if j != source and j not in exact
                 and embedded.hashes[j] != embedded.hashes[source]]
    return choose_threshold(planted, np.asarray(unplanted), kinds, len(images) * (len(embedded.ids) - 1),
                            target_precision)


def choose_threshold(planted: np.ndarray, unplanted: np.ndarray, kinds: list[str], all_unplanted: int,
                     target_precision: float) -> Calibration:
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
    by_kind = {kind: float(np.mean([p >= threshold for p, k in zip(planted, kinds) if k == kind]))
               for kind in TRANSFORMS if kind in kinds}
    return Calibration(threshold, precision, recall, false_positives / all_unplanted, len(planted), by_kind)


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


def eval_leaks(eval_urls: list[str], embed: Embed, index, train: Embedded, threshold: float, progress: bool,
               batch_size: int = 64) -> tuple[set[int], int]:
    """Training images that copy an evaluation image: the same bytes, or one of the evaluation image's crop views
    at or above the threshold; and how many evaluation images were read."""
    train_by_hash: dict[str, list[int]] = {}
    for i, digest in enumerate(train.hashes):
        train_by_hash.setdefault(digest, []).append(i)
    leaks: set[int] = set()
    pending: list[Image.Image] = []
    read = 0

    def search(images: list[Image.Image]) -> None:
        for found in search_views(index, embed_views(images, embed)):
            leaks.update(j for j, similarity in found.items() if similarity >= threshold)

    for _, digest, image in iter_images(eval_urls, Counter(), progress):
        read += 1
        leaks.update(train_by_hash.get(digest, ()))
        pending.append(image)
        if len(pending) == batch_size:
            search(pending)
            pending = []
    if pending:
        search(pending)
    return leaks, read


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
    eval_threshold = threshold
    if eval_urls and "calibration" in report:
        views_calibration = calibrate_views(images, train, index, embed, seed, exclude=exact,
                                            target_precision=EVAL_TARGET_PRECISION)
        eval_threshold = views_calibration.threshold
        report["eval_calibration"] = views_calibration.to_dict()
    report["eval_threshold"] = eval_threshold
    near = near_duplicates(index, train.embeddings, threshold, exact) - exact
    leaks: set[int] = set()
    if eval_urls:
        leaks, report["eval_images"] = eval_leaks(eval_urls, embed, index, train, eval_threshold, progress)
        leaks -= exact | near
    dropped = exact | near | leaks
    rules = [{"rule": "exact duplicate (same image bytes as an earlier sample)", "dropped": len(exact)},
             {"rule": f"near duplicate of an earlier sample (similarity >= {threshold:.6f})", "dropped": len(near)}]
    if eval_urls:
        rules.append({"rule": f"copies an evaluation image (a crop view's similarity >= {eval_threshold:.6f})",
                      "dropped": len(leaks)})
    kept = {sample: {} for index_, sample in enumerate(train.ids) if index_ not in dropped}
    return Selection(kept, len(train.ids), rules), report
