"""Shard lists: expanding brace patterns and assigning shards to (rank, worker) slots per epoch."""

from __future__ import annotations

import glob
import os
import random
import re

import braceexpand

from contrastive.data.remote import LISTABLE_PROTOCOLS, check_remote_shards_readable, list_shards, protocol_of
from contrastive.errors import InputError


def expand_shards(pattern: str) -> list[str]:
    """Expand brace patterns and directories (every .tar inside, in natural order), local or an s3:// or gs://
    prefix; several parts may be joined with '::' (as open_clip and webdataset users write)."""
    urls: list[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if part and os.path.isdir(part):
            urls.extend(sorted(glob.glob(os.path.join(part, "*.tar")), key=natural_sort_key))
        elif protocol_of(part) in LISTABLE_PROTOCOLS and "{" not in part and not part.endswith(".tar"):
            urls.extend(sorted(list_shards(part), key=natural_sort_key))
        elif part:
            urls.extend(braceexpand.braceexpand(part))
    if not urls:
        raise InputError(f"shard pattern {pattern!r} names no shards")
    return urls


def natural_sort_key(text: str) -> list[int | str]:
    """'2.tar' before '10.tar'."""
    return [int(token) if token.isdigit() else token for token in re.split(r"(\d+)", text)]


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def check_shards_exist(urls: list[str], source_name: str) -> None:
    """Every local shard exists, and the first shard of every bucket or server can be read (missing buckets and
    credentials show here, before any compute)."""
    missing = [url for url in urls if is_local(url) and not os.path.exists(url)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(f"data source {source_name!r}: {len(missing)} of {len(urls)} shards do not exist: {shown}")
    check_remote_shards_readable(urls, source_name)


def check_epoch_mode_slots(num_shards: int, world_size: int, num_workers: int, source_name: str = "") -> None:
    if num_shards < world_size * num_workers:
        raise InputError(
            f"epoch mode needs at least one shard per (rank, worker) slot: data source {source_name!r} has "
            f"{num_shards} shards for {world_size} ranks x {num_workers} workers; "
            f"use fewer workers, more shards, or data.resampled=true"
        )


def slot_seed(*parts: int | str) -> int:
    """A stable seed from its parts (Python's hash() of strings changes between processes)."""
    return random.Random("/".join(str(part) for part in parts)).getrandbits(63)


def shards_for_slot(
    urls: list[str],
    *,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    seed: int,
    resampled: bool,
) -> list[str]:
    """The shards one (rank, worker) slot reads in one epoch.

    Epoch mode: all shards shuffled by the epoch seed (identically on every rank), split by rank then by worker,
    so every shard is read exactly once per epoch. Resampled mode: an independent draw with replacement of as
    many shards as the slot's epoch-mode share, seeded by (seed, rank, worker, epoch).
    """
    if resampled:
        rng = random.Random(slot_seed(seed, "resample", rank, worker, epoch))
        count = max(1, -(-len(urls) // (world_size * num_workers)))
        return [rng.choice(urls) for _ in range(count)]
    check_epoch_mode_slots(len(urls), world_size, num_workers)
    order = list(urls)
    random.Random(slot_seed(seed, "epoch", epoch)).shuffle(order)
    return order[rank::world_size][worker::num_workers]
