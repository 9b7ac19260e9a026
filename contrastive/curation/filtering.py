"""`filter`: keep the samples whose scores pass `--where` rules and/or rank in the top fraction by similarity,
and write them as new shards (or only as a key list), with a manifest of what each rule dropped and where
everything came from."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from contrastive.curation.extra import require
from contrastive.curation.scoring import EMBEDDING_COLUMN
from contrastive.curation.shard_writer import EvenShardWriter
from contrastive.curation.where import Rule, parse_where
from contrastive.data.reader import iter_shard
from contrastive.data.remote import write_stats_file
from contrastive.data.shards import is_local
from contrastive.errors import ConfigError, InputError

MANIFEST_FILE = "manifest.json"
KEEP_LIST_FILE = "keep.txt"


@dataclass
class Selection:
    """Which scored samples are kept: keyed by (shard URL, sample key), with what each rule dropped."""

    kept: dict[tuple[str, str], dict]  # (shard, key) -> fields added to the sample's json
    scored: int
    rules: list[dict] = field(default_factory=list)  # {"rule", "dropped"}: samples failing it (they may fail several)


def shard_id(url: str) -> str:
    """A shard's name for matching scores to shards: local paths made absolute, so `demo/train` given to filter
    finds the rows `score` wrote for `/data/demo/train`."""
    return os.path.abspath(url) if is_local(url) else url


def score_columns(table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy(zero_copy_only=False)
            for name in table.column_names if name != EMBEDDING_COLUMN}


def embedding_matrix(table, what: str) -> np.ndarray:
    """(N, D) float32 from the image_embedding column."""
    if EMBEDDING_COLUMN not in table.column_names:
        raise InputError(f"{what} has no {EMBEDDING_COLUMN} column: score it with --embeddings")
    column = table.column(EMBEDDING_COLUMN).combine_chunks()
    return np.asarray(column.flatten(), dtype=np.float32).reshape(len(table), -1)


def image_cluster_mask(pool: np.ndarray, reference: np.ndarray, clusters: int, seed: int = 0) -> np.ndarray:
    """DataComp's image-based filter: k-means over the pool's image embeddings; keep the samples whose cluster is
    the nearest for at least one reference image (DataComp: ImageNet's training images, 100k clusters)."""
    faiss = require("faiss")
    if pool.shape[1] != reference.shape[1]:
        raise InputError(f"the reference embeddings have {reference.shape[1]} dimensions, the pool's "
                         f"{pool.shape[1]}: score both with the same model")
    if not 1 <= clusters <= len(pool):
        raise ConfigError(f"--clusters must be between 1 and the {len(pool)} scored samples, got {clusters}")
    kmeans = faiss.Kmeans(pool.shape[1], clusters, niter=20, seed=seed, spherical=True)
    kmeans.train(np.ascontiguousarray(pool))
    _, pool_clusters = kmeans.index.search(np.ascontiguousarray(pool), 1)
    _, reference_clusters = kmeans.index.search(np.ascontiguousarray(reference), 1)
    return np.isin(pool_clusters[:, 0], np.unique(reference_clusters[:, 0]))


def select(table, where: str | None, top_fraction: float | None, image_reference=None, clusters: int = 0,
           seed: int = 0) -> Selection:
    """`image_reference`: a scores table with embeddings of the reference set, for the image-based filter."""
    columns = score_columns(table)
    rows = len(columns["key"])
    passing = np.ones(rows, dtype=bool)
    rules: list[tuple[str, np.ndarray]] = []
    for rule in parse_where(where, set(columns)) if where else []:
        rules.append((rule.text, _evaluate(rule, columns, rows)))
    if top_fraction is not None:
        if not 0 < top_fraction <= 1:
            raise ConfigError(f"--top-fraction must be in (0, 1], got {top_fraction}")
        # DataComp's CLIP-score baseline: the best fraction of the whole scored pool; ties go to the smaller key.
        order = np.lexsort((columns["key"], -columns["similarity"].astype(np.float64)))
        best = np.zeros(rows, dtype=bool)
        best[order[:math.ceil(round(top_fraction * rows, 6))]] = True  # 0.3 * 30 is 9.000000000000002: keep 9
        rules.append((f"top {top_fraction:g} by similarity", best))
    if image_reference is not None:
        near = image_cluster_mask(embedding_matrix(table, "the scores"),
                                  embedding_matrix(image_reference, "the image reference"), clusters, seed)
        rules.append((f"image cluster holds a reference image ({clusters} clusters)", near))
    for _, mask in rules:
        passing &= mask
    kept = {(shard_id(shard), key): {"similarity": float(similarity)} for shard, key, similarity, keep
            in zip(columns["shard"], columns["key"], columns["similarity"], passing) if keep}
    return Selection(kept, rows, [{"rule": text, "dropped": int((~mask).sum())} for text, mask in rules])


def _evaluate(rule: Rule, columns: dict[str, np.ndarray], rows: int) -> np.ndarray:
    try:
        mask = rule.predicate(columns)
    except TypeError as error:  # e.g. a number compared with the language column
        raise ConfigError(f"--where rule {rule.text!r} compares values of different types: {error}") from None
    return np.broadcast_to(np.asarray(mask, dtype=bool), (rows,)).copy()


def _add_fields(sample: dict, fields: dict) -> dict:
    if not fields:
        return sample
    metadata = json.loads(sample["json"]) if "json" in sample else {}
    return {**sample, "json": json.dumps({**metadata, **fields}).encode()}


def filter_shards(urls: list[str], selection: Selection, out: Path, *, samples_per_shard: int, keep_list: bool,
                  provenance: dict, progress: bool = True) -> dict:
    """Write the kept samples as evened-out shards (or, with keep_list, only their keys) and the manifest. The
    dedup and balance commands write their selections through here too."""
    if samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise InputError(f"{out} already holds shards; filter into an empty directory")
    unknown = {shard for shard, _ in selection.kept} - {shard_id(url) for url in urls}
    if unknown:
        raise InputError(f"the scores name {len(unknown)} shards not in SHARDS, e.g. {sorted(unknown)[0]}; "
                         "pass the shards that were scored")
    if keep_list:
        keys = sorted(key for _, key in selection.kept)
        (out / KEEP_LIST_FILE).write_text("".join(f"{key}\n" for key in keys))
        written: dict[str, int] = {}
        read = Counter()
    else:
        writer = EvenShardWriter(out, len(selection.kept), samples_per_shard)
        read: Counter = Counter()
        for url in tqdm(urls, desc="filtering", unit="shard", disable=not progress):
            shard = shard_id(url)
            for sample in iter_shard(url, read):
                read["samples"] += 1
                fields = selection.kept.get((shard, sample["__key__"]))
                if fields is not None:
                    writer.write(_add_fields(sample, fields))
                    read["kept"] += 1
        writer.close()
        written = writer.written
        if read["kept"] != len(selection.kept):
            raise InputError(f"{len(selection.kept) - read['kept']} kept samples were not found in their shards "
                             "(the shards changed since scoring?)")
        write_stats_file(str(out), written)
    manifest = {
        **provenance,
        "shards_in": urls,
        "scored": selection.scored,
        "kept": len(selection.kept),
        "dropped": selection.scored - len(selection.kept),
        "rules": selection.rules,
        "read": dict(read),
        "shards_out": written,
        "keep_list": str(out / KEEP_LIST_FILE) if keep_list else None,
    }
    temporary = out / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, out / MANIFEST_FILE)
    return manifest
