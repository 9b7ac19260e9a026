"""The training stream: shards -> raw samples -> shuffle -> (exact-resume skip) -> decode -> batches.

Each DataLoader worker is a *logical* worker with its own deterministic stream seeded by (seed, rank, worker).
A batch carries its worker's position (per-source epoch and raw samples consumed in it, mixer draws, skip
counts). Resuming at step k gives DataLoader worker i the stream of logical worker (k + i) mod W, restarted at
its recorded position: the DataLoader's round-robin then yields exactly the batches an uninterrupted run would.
Skipping happens on raw bytes, before any decoding.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from contrastive.data.reader import RawSample, iter_shard
from contrastive.data.shards import shards_for_slot, slot_seed
from contrastive.data.transforms import IMAGE_EXTENSIONS, BadSample, decode_image
from contrastive.types import Batch

log = logging.getLogger(__name__)
MIN_SAMPLES_FOR_SKIP_CHECK = 200
LOGGED_BAD_SAMPLES_PER_WORKER = 5


@dataclass(frozen=True)
class Source:
    name: str
    urls: list[str]
    weight: float


@dataclass(frozen=True)
class StreamLayout:
    """Where this rank's stream sits among all streams."""

    rank: int
    world_size: int
    num_workers: int  # DataLoader workers per rank, at least 1
    seed: int
    resampled: bool
    shuffle_buffer: int


def shuffled(samples: Iterator[RawSample], buffer_size: int, rng: random.Random) -> Iterator[RawSample]:
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[RawSample] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def decode_sample(
    raw: RawSample, transform: Callable, image_size: int, require_caption: bool = True
) -> tuple[torch.Tensor, str, int | None]:
    image_bytes = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_bytes is None:
        raise BadSample("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} file")
    try:
        caption = raw.get("txt", b"").decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise BadSample("bad_caption_encoding", str(error)) from error
    if require_caption and "txt" not in raw:
        raise BadSample("missing_caption")
    if require_caption and not caption:
        raise BadSample("empty_caption")
    label = None
    if "cls" in raw:
        try:
            label = int(raw["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as error:
            raise BadSample("bad_label", str(error)) from error
    image = transform(decode_image(image_bytes, image_size))
    if image.shape[-2:] != (image_size, image_size):
        raise BadSample("wrong_image_size", f"transform gave {tuple(image.shape)}")
    return image, caption, label


class ImageTextStream(IterableDataset):
    """An infinite stream of local batches (see the module docstring for determinism and resume)."""

    def __init__(
        self,
        sources: list[Source],
        layout: StreamLayout,
        transform: Callable,
        tokenizer: Callable[[list[str]], torch.Tensor],
        image_size: int,
        local_batch_size: int,
        max_skip_fraction: float = 1.0,
        start_step: int = 0,
        positions: dict[int, dict] | None = None,
    ) -> None:
        super().__init__()
        self.sources = sources
        self.layout = layout
        self.transform = transform
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.local_batch_size = local_batch_size
        self.max_skip_fraction = max_skip_fraction
        self.start_step = start_step
        self.positions = positions or {}

    def _source_samples(self, source: Source, worker: int, epoch: int, consumed: int, skipped: Counter):
        """Yield (epoch, consumed after this sample, raw sample) forever, starting after `consumed` in `epoch`."""
        layout = self.layout
        for current_epoch in itertools.count(epoch):
            urls = shards_for_slot(
                source.urls, epoch=current_epoch, rank=layout.rank, world_size=layout.world_size,
                worker=worker, num_workers=layout.num_workers, seed=layout.seed, resampled=layout.resampled,
            )
            raw = itertools.chain.from_iterable(iter_shard(url, skipped) for url in urls)
            rng = random.Random(slot_seed(layout.seed, "shuffle", source.name, layout.rank, worker, current_epoch))
            yielded = False
            for index, sample in enumerate(shuffled(raw, layout.shuffle_buffer, rng)):
                yielded = True
                if current_epoch == epoch and index < consumed:
                    continue
                yield current_epoch, index + 1, sample
            if not yielded:
                raise ValueError(f"data source {source.name!r} yielded no samples in a full pass over {urls[:3]}...")

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        worker = (self.start_step + loader_worker) % self.layout.num_workers
        position = self.positions.get(worker, {})
        skipped: Counter = Counter(position.get("skipped", {}))
        seen = position.get("samples_seen", 0)
        source_positions = {s.name: tuple(position.get("sources", {}).get(s.name, (0, 0))) for s in self.sources}
        streams = {
            s.name: self._source_samples(s, worker, *source_positions[s.name], skipped) for s in self.sources
        }
        mixer = random.Random(slot_seed(self.layout.seed, "mix", self.layout.rank, worker))
        mixer_draws = position.get("mixer_draws", 0)
        names, weights = [s.name for s in self.sources], [s.weight for s in self.sources]
        for _ in range(mixer_draws):
            mixer.choices(names, weights)

        images, captions, labels, keys = [], [], [], []
        while True:
            name = mixer.choices(names, weights)[0]
            mixer_draws += 1
            epoch, consumed, raw = next(streams[name])
            source_positions[name] = (epoch, consumed)
            try:
                torch.manual_seed(slot_seed(self.layout.seed, "augment", name, self.layout.rank, worker, epoch, consumed))
                image, caption, label = decode_sample(raw, self.transform, self.image_size)
            except BadSample as bad:
                skipped[bad.reason] += 1
                self._check_skip_rate(skipped, seen, raw, bad)
                continue
            seen += 1
            images.append(image)
            captions.append(caption)
            labels.append(-1 if label is None else label)
            keys.append(str(raw["__key__"]))
            if len(images) < self.local_batch_size:
                continue
            yield Batch(
                images=torch.stack(images),
                tokens=self.tokenizer(captions),
                keys=keys,
                labels=torch.tensor(labels),
                stream_state={
                    "worker": worker,
                    "sources": {n: list(p) for n, p in source_positions.items()},
                    "mixer_draws": mixer_draws,
                    "skipped": dict(skipped),
                    "samples_seen": seen,
                },
            )
            images, captions, labels, keys = [], [], [], []

    def _check_skip_rate(self, skipped: Counter, seen: int, raw: RawSample, bad: BadSample) -> None:
        total_skipped = sum(skipped.values())
        if total_skipped <= LOGGED_BAD_SAMPLES_PER_WORKER:
            log.warning("skipping sample %s from %s: %s", raw.get("__key__"), raw.get("__url__"), bad)
        total = total_skipped + seen
        if total >= MIN_SAMPLES_FOR_SKIP_CHECK and total_skipped > self.max_skip_fraction * total:
            raise ValueError(
                f"{total_skipped} of {total} samples were bad ({dict(skipped)}), more than "
                f"data.max_skip_fraction={self.max_skip_fraction}; check the shards (contrastive-data inspect)"
            )
