"""The length of a finite run: every rank stops at the same step, and the samples that do not fill it are stated.

A run is finite when every source is capped (`data.epochs`, a source's `epochs` or `max_samples`). Which shards
each (rank, worker) slot reads in each epoch is a pure function of the seed, so every rank can count every
slot's samples up front from the shard sizes and arrive at the same last step, with no collective inside the
loop. Each logical worker w of a rank serves steps w, w + W, w + 2W, ... (W workers), so a rank can take
min_w(batches_w * W + w) steps, and the run takes the minimum over ranks. The samples of the slots with more
data than that are the leftover: logged and returned, not silently lost.

Shard sizes come from img2dataset's `NAME_stats.json` ("successes") beside a local shard, else from reading the
tar headers (cheap for local files, a full read for remote ones).
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass

import webdataset as wds

from contrastive.data.reader import split_key
from contrastive.data.shards import is_local, shards_for_slot
from contrastive.errors import ConfigError

log = logging.getLogger(__name__)


def _stats_file_count(url: str) -> int | None:
    stats = os.path.splitext(url)[0] + "_stats.json"
    if not (is_local(url) and os.path.exists(stats)):
        return None
    with open(stats) as handle:
        successes = json.load(handle).get("successes")
    return int(successes) if successes is not None else None


def count_shard_samples(url: str) -> int:
    """Samples (distinct keys) in one shard; an unreadable or truncated shard counts what can be read."""
    known = _stats_file_count(url)
    if known is not None:
        return known
    keys: set[str] = set()
    try:
        if is_local(url):
            archive = tarfile.open(url, mode="r:")  # seekable: reads headers only
            stream = None
        else:
            stream = wds.gopen(url)
            archive = tarfile.open(fileobj=stream, mode="r|*")
        with archive:
            for member in archive:
                key, extension = split_key(member.name)
                if member.isreg() and extension and not key.startswith("__"):
                    keys.add(key)
        if stream is not None:
            stream.close()
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        log.warning("counting %s stopped after %d samples: %s", url, len(keys), error)
    return len(keys)


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
    slots = world_size * num_workers

    def count(url: str) -> int:
        if url not in counts:
            counts[url] = count_shard_samples(url)
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
