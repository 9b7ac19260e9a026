"""Scoring shards with an encoder: one Parquet row per sample with its image-text cosine similarity, optionally
its image embedding, its caption's token count and its language.

Each shard's rows go to a part file of their own (`SCORES.parts/<hash of the shard URL>.parquet`, written to a
temporary name and renamed), so a killed run resumes by skipping the shards whose part exists. Under torchrun
each rank scores every world_size-th shard; nothing crosses ranks but a barrier, after which rank 0 joins the
parts in shard order into SCORES. The table's metadata keeps the model's source and hash and the skip counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from contrastive.curation.extra import require
from contrastive.data.reader import RawSample, iter_shard
from contrastive.data.transforms import IMAGE_EXTENSIONS, BadSample, decode_image
from contrastive.encoders import LoadedEncoder
from contrastive.errors import InputError

log = logging.getLogger(__name__)

EMBEDDING_COLUMN = "image_embedding"


def image_bytes(sample: RawSample) -> bytes:
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return sample[extension]
    raise BadSample("missing_image")


def caption_text(sample: RawSample) -> str:
    if "txt" not in sample:
        raise BadSample("missing_caption")
    text = sample["txt"].decode("utf-8", errors="replace").strip()
    if not text:
        raise BadSample("empty_caption")
    return text


def model_hash(source: str | Path) -> str:
    """sha256 of the weights file, or of every file under a model directory (relative names and contents)."""
    path = Path(source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def part_path(scores: Path, url: str) -> Path:
    return parts_dir(scores) / f"{hashlib.sha256(url.encode()).hexdigest()[:24]}.parquet"


def parts_dir(scores: Path) -> Path:
    return scores.with_name(scores.name + ".parts")


@dataclass
class ScoreOptions:
    batch_size: int = 256
    with_embeddings: bool = False
    min_image_size: int = 8


def _batches(samples: Iterator[RawSample], encoder: LoadedEncoder, options: ScoreOptions, skipped: Counter):
    """(keys, images (B, 3, S, S), captions) in groups of batch_size; bad samples are counted, not scored."""
    transform = encoder.preprocess.transform()
    size = encoder.preprocess.image_size
    keys, images, captions = [], [], []
    for sample in samples:
        try:
            caption = caption_text(sample)
            image = transform(decode_image(image_bytes(sample), size, options.min_image_size))
        except BadSample as bad:
            skipped[bad.reason] += 1
            continue
        keys.append(sample["__key__"])
        images.append(image)
        captions.append(caption)
        if len(keys) == options.batch_size:
            yield keys, torch.stack(images), captions
            keys, images, captions = [], [], []
    if keys:
        yield keys, torch.stack(images), captions


def token_counts(tokens: torch.Tensor) -> list[int]:
    """Non-padding tokens per row of the tokenizer's (N, context_length) output, start and end tokens included
    (the count the text tower sees, so a caption longer than the context counts as the context length)."""
    return (tokens != 0).sum(dim=1).tolist()


@torch.no_grad()
def score_shard(url: str, encoder: LoadedEncoder, device: torch.device, options: ScoreOptions):
    """The pyarrow table of one shard's scores and the skip counts it found."""
    pa = require("pyarrow")
    langid = require("py3langid")
    skipped: Counter = Counter()
    columns: dict[str, list] = {"shard": [], "key": [], "similarity": [], "caption_tokens": [], "language": []}
    embeddings = []
    for keys, images, captions in _batches(iter_shard(url, skipped), encoder, options, skipped):
        tokens = encoder.tokenizer(captions)
        image_features = encoder.model.encode_image(images.to(device)).float()  # (B, D), L2-normalised
        text_features = encoder.model.encode_text(tokens.to(device)).float()
        columns["shard"] += [url] * len(keys)
        columns["key"] += keys
        columns["similarity"] += (image_features * text_features).sum(dim=1).cpu().tolist()
        columns["caption_tokens"] += token_counts(tokens)
        columns["language"] += [langid.classify(caption)[0] for caption in captions]
        if options.with_embeddings:
            embeddings += image_features.cpu().tolist()
    types = {"shard": pa.string(), "key": pa.string(), "similarity": pa.float32(), "caption_tokens": pa.int32(),
             "language": pa.string()}
    arrays = {name: pa.array(values, type=types[name]) for name, values in columns.items()}
    if options.with_embeddings:
        arrays[EMBEDDING_COLUMN] = pa.array(embeddings, type=pa.list_(pa.float32()))
    table = pa.table(arrays).replace_schema_metadata({"skipped": json.dumps(dict(skipped))})
    return table, skipped


def _write_atomically(table, path: Path) -> None:
    parquet = require("pyarrow.parquet")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    parquet.write_table(table, temporary)
    os.replace(temporary, path)


def score_shards(urls: list[str], encoder: LoadedEncoder, scores: Path, *, rank: int, world_size: int,
                 barrier, device: torch.device, options: ScoreOptions, progress: bool = True) -> dict:
    """Score this rank's shards (those without a part file yet), wait for every rank, and on rank 0 join the parts
    into `scores`. Returns {"scored": shards scored now, "resumed": shards found done, "skipped": Counter}."""
    if not encoder.has_text_tower:
        raise InputError(f"{encoder.source} is an image-only encoder: scoring needs a text tower")
    parts_dir(scores).mkdir(parents=True, exist_ok=True)
    mine = urls[rank::world_size]
    todo = [url for url in mine if not part_path(scores, url).exists()]
    if len(todo) < len(mine):
        log.info("rank %d: %d of its %d shards already scored, resuming", rank, len(mine) - len(todo), len(mine))
    skipped: Counter = Counter()
    for url in tqdm(todo, desc=f"scoring (rank {rank})", unit="shard", disable=not progress or rank != 0):
        table, shard_skips = score_shard(url, encoder, device, options)
        skipped.update(shard_skips)
        _write_atomically(table, part_path(scores, url))
    barrier()
    if rank == 0:
        merge_parts(urls, scores, {"model": encoder.source, "model_sha256": model_hash(encoder.source)})
    barrier()
    return {"scored": len(todo), "resumed": len(mine) - len(todo), "skipped": skipped}


def merge_parts(urls: list[str], scores: Path, metadata: dict[str, str]) -> None:
    pa = require("pyarrow")
    parquet = require("pyarrow.parquet")
    missing = [url for url in urls if not part_path(scores, url).exists()]
    if missing:
        raise InputError(f"{len(missing)} shards have no scores in {parts_dir(scores)}, e.g. {missing[0]}")
    tables = [parquet.read_table(part_path(scores, url)) for url in urls]
    skipped: Counter = Counter()
    for table in tables:
        skipped.update(json.loads(table.schema.metadata[b"skipped"]))
    merged = pa.concat_tables([table.replace_schema_metadata(None) for table in tables])
    metadata = {**metadata, "shards": json.dumps(urls), "skipped": json.dumps(dict(skipped))}
    _write_atomically(merged.replace_schema_metadata(metadata), scores)


def read_scores(path: str | Path):
    """The scores table and its metadata (model, model_sha256, shards, skipped) as strings."""
    parquet = require("pyarrow.parquet")
    if not Path(path).is_file():
        raise InputError(f"scores file {path} does not exist (write it with `contrastive-data score`)")
    table = parquet.read_table(path)
    metadata = {key.decode(): value.decode() for key, value in (table.schema.metadata or {}).items()}
    return table, metadata
