"""The length of a finite run: every rank stops at the same step, and the samples that do not fill it are stated.

A run is finite when every source is capped (`data.epochs`, a source's `epochs` or `max_samples`). Which shards
each (rank, worker) slot reads in each epoch is a pure function of the seed, so every rank can count every
slot's samples up front from the shard sizes and arrive at the same last step, with no collective inside the
loop. Each logical worker w of a rank serves steps w, w + W, w + 2W, ... (W workers), so a rank can take
min_w(batches_w * W + w) steps, and the run takes the minimum over ranks. The samples of the slots with more
data than that are the leftover: logged and returned, not silently lost.

Shard sizes come, in this order, from a `_stats.json` beside the shards (written by `contrastive-data inspect
--write-stats`: one small read per directory or prefix), img2dataset's `NAME_stats.json` ("successes") beside a
shard, or the tar headers: cheap for local files, and for remote ones a ranged read of the headers that stops with
an error asking for the stats file once it has fetched PLAN_READ_LIMIT_BYTES of one shard.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass

import webdataset as wds

from contrastive.data.reader import split_key
from contrastive.data.remote import DEFAULT_RETRY, PERMANENT_ERRORS, filesystem, protocol_of, read_stats_file
from contrastive.data.shards import shards_for_slot
from contrastive.errors import ConfigError, InputError

log = logging.getLogger(__name__)
PLAN_READ_LIMIT_BYTES = 64 << 20
PLAN_BLOCK_BYTES = 256 << 10


def _split(url: str) -> tuple[str, str]:
    return posixpath.split(url) if protocol_of(url) else os.path.split(url)


def _img2dataset_count(url: str) -> int | None:
    stats = os.path.splitext(url)[0] + "_stats.json"
    protocol = protocol_of(url)
    try:
        if protocol is None:
            with open(stats) as handle:
                successes = json.load(handle).get("successes")
        else:
            successes = json.loads(filesystem(protocol).cat_file(stats)).get("successes")
    except FileNotFoundError:
        return None
    return int(successes) if successes is not None else None


def _add_keys(archive: tarfile.TarFile, keys: set[str], over_limit=lambda: False) -> None:
    """Add the sample keys of `archive` to `keys` (kept when the archive breaks halfway)."""
    for member in archive:
        key, extension = split_key(member.name)
        if member.isreg() and extension and not key.startswith("__"):
            keys.add(key)
        if over_limit():
            return


def _count_remote_headers(url: str) -> int:
    """Samples in a remote shard from its tar headers, read by ranges; transient errors are retried."""
    client = filesystem(protocol_of(url))
    for attempt in range(1, DEFAULT_RETRY.attempts + 1):
        keys: set[str] = set()
        try:
            with client.open(url, "rb", block_size=PLAN_BLOCK_BYTES, cache_type="readahead") as handle, \
                    tarfile.open(fileobj=handle, mode="r:") as archive:
                over_limit = lambda: handle.cache.total_requested_bytes > PLAN_READ_LIMIT_BYTES
                _add_keys(archive, keys, over_limit)
                if over_limit():
                    raise InputError(
                        f"counting the samples of {url} from its tar headers fetched more than "
                        f"{PLAN_READ_LIMIT_BYTES >> 20} MiB; write the counts once with `contrastive-data inspect "
                        f"{_split(url)[0]}/ --write-stats` (a finite run needs every shard's size up front)")
                return len(keys)
        except (tarfile.TarError, EOFError) as error:  # a damaged shard: its readable part, as the reader sees it
            log.warning("counting %s stopped after %d samples: %s", url, len(keys), error)
            return len(keys)
        except PERMANENT_ERRORS as error:
            raise InputError(f"cannot count the samples of {url}: {type(error).__name__}: {error}") from error
        except Exception as error:  # the clients' transient errors share no base class
            if attempt == DEFAULT_RETRY.attempts:
                raise InputError(f"cannot count the samples of {url} after {attempt} tries: "
                                 f"{type(error).__name__}: {error}") from error
            time.sleep(DEFAULT_RETRY.wait_before(attempt + 1))
    raise AssertionError("unreachable: the last attempt returns or raises")


def _count_local_or_pipe(url: str) -> int:
    keys: set[str] = set()
    try:
        if os.path.exists(url):
            with tarfile.open(url, mode="r:") as archive:  # seekable: reads headers only
                _add_keys(archive, keys)
        else:  # a pipe: command, read front to back
            with wds.gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
                _add_keys(archive, keys)
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        log.warning("counting %s stopped after %d samples: %s", url, len(keys), error)
    return len(keys)


def count_shard_samples(url: str, directory_stats: dict[str, dict[str, int] | None] | None = None) -> int:
    """Samples (distinct keys) in one shard; an unreadable or truncated shard counts what can be read.
    `directory_stats` caches each directory's `_stats.json` (None where there is none)."""
    directory_stats = {} if directory_stats is None else directory_stats
    directory, name = _split(url)
    if directory not in directory_stats:
        directory_stats[directory] = read_stats_file(directory)
    listed = directory_stats[directory]
    if listed is not None and name in listed:
        return listed[name]
    known = _img2dataset_count(url)
    if known is not None:
        return known
    return _count_remote_headers(url) if protocol_of(url) else _count_local_or_pipe(url)


@dataclass(frozen=True)
class RunPlan:
    steps: int  # every rank stops after this many steps
    planned_samples: int  # raw samples within every source's cap, over all ranks
    leftover_samples: int  # of those, the ones no step uses
    rank_steps: list[int]  # what each rank alone could have taken


def plan_finite_run(sources: Iterable, *, world_size: int, num_workers: int, seed: int, resampled: bool,
                    local_batch_size: int, counts: dict[str, int] | None = None) -> RunPlan | None:
    """None when some source is uncapped (an endless stream: trainer.max_steps decides)."""
    sources = list(sources)
    if not all(source.capped for source in sources):
        return None
    counts = dict(counts or {})
    directory_stats: dict[str, dict[str, int] | None] = {}
    slots = world_size * num_workers

    def count(url: str) -> int:
        if url not in counts:
            counts[url] = count_shard_samples(url, directory_stats)
        return counts[url]

    rank_steps, planned = [], 0
    for rank in range(world_size):
        worker_steps = []
        for worker in range(num_workers):
            total = 0
            for source in sources:
                if source.epochs is None:  # capped by max_samples alone: the slot's epochs until the share is met
                    share = source.slot_share(rank * num_workers + worker, slots)
                    taken, epoch = 0, 0
                    while taken < share:
                        urls = shards_for_slot(source.urls, epoch=epoch, rank=rank, world_size=world_size,
                                               worker=worker, num_workers=num_workers, seed=seed, resampled=resampled)
                        epoch_samples = sum(count(url) for url in urls)
                        if epoch_samples == 0:
                            raise ConfigError(f"data source {source.name!r} has no samples "
                                              f"for rank {rank} worker {worker}")
                        taken += epoch_samples
                    total += share
                    continue
                taken = sum(count(url) for epoch in range(source.epochs)
                            for url in shards_for_slot(source.urls, epoch=epoch, rank=rank, world_size=world_size,
                                                       worker=worker, num_workers=num_workers, seed=seed,
                                                       resampled=resampled))
                share = source.slot_share(rank * num_workers + worker, slots)
                total += taken if share is None else min(taken, share)
            planned += total
            worker_steps.append((total // local_batch_size) * num_workers + worker)
        rank_steps.append(min(worker_steps))
    steps = min(rank_steps)
    leftover = planned - steps * local_batch_size * world_size
    if steps == 0:
        raise ConfigError(f"the capped data sources hold {planned} samples, too few for one step of "
                         f"{local_batch_size} samples on each of {world_size} ranks x {num_workers} workers")
    return RunPlan(steps=steps, planned_samples=planned, leftover_samples=leftover, rank_steps=rank_steps)
