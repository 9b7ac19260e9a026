"""The training stream: shards -> raw samples -> shuffle -> (exact-resume skip) -> decode -> batches.

Each DataLoader worker is a *logical* worker with its own deterministic stream seeded by (seed, rank, worker).
A batch carries its worker's position (per-source epoch and raw samples consumed in it, mixer draws, skip
counts). Resuming at step k gives DataLoader worker i the stream of logical worker (k + i) mod W, restarted at
its recorded position: the DataLoader's round-robin then yields exactly the batches an uninterrupted run would.
Skipping happens on raw bytes, before any decoding.

With length bucketing, each window of `bucket_batches` local batches is sorted by caption token count, cut into
batches padded only to their own longest caption, and yielded in a shuffled order. A batch inside a window carries
the window's start and how many of its batches came before; a resume reads the window again and skips those.

Sources are mixed per sample by weight. A capped source (epochs, max_samples) leaves the mix at its cap; when
every source is capped the run is finite and contrastive.data.plan computes its last step. Workers write uint8
crops straight into the batch's shared memory (inside DataLoader workers) and yield them as uint8: the trainer
normalises on its device (transforms.BatchNormalize).
NaFlex (contrastive.data.naflex): each batch is for a known training step: a DataLoader worker's first batch is
for step start_step + its index, and each further one num_workers steps later (the round-robin above). The
step's sequence length, a function of (seed, step), sizes every image of the batch; batches carry patches,
their coordinates and validity instead of crops, normalised in the workers (padding must stay
zero, which needs each image's mask). Positions and skip
counts are kept exactly as for crops.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch.utils.data import IterableDataset, get_worker_info

from contrastive.data.batch_memory import BatchMemory, ImageRing, shared_tensor
from contrastive.data.boxes import DecoderTasks, crop_boxes, read_boxes, tokenize_decoder_texts
from contrastive.data.naflex import NaFlexImage, pack, seq_len_for_step
from contrastive.data.reader import RawSample, iter_shard
from contrastive.data.reinforced import normalized_rows, read_sample_files
from contrastive.data.remote import DEFAULT_RETRY, RetryPolicy
from contrastive.data.shards import shards_for_slot, slot_seed
from contrastive.data.transforms import (
    IMAGE_EXTENSIONS,
    BadSample,
    DeviceJpeg,
    DeviceJpegCrop,
    decode_image,
    stored_decode_size,
)
from contrastive.errors import InputError
from contrastive.types import Batch, StreamPosition, TeacherTargets

log = logging.getLogger(__name__)
MIN_SAMPLES_FOR_SKIP_CHECK = 200
# Every reason a sample or shard is skipped for (reader, decode_sample, decode_image), for per-reason metrics.
SAMPLE_SKIP_REASONS = ("missing_image", "bad_caption_encoding", "missing_caption", "empty_caption", "bad_label",
                       "corrupt_image", "wrong_image_mode", "wrong_image_size", "missing_teacher_embeddings",
                       "bad_boxes")
SHARD_LOSS_REASONS = ("truncated_shard", "unreadable_shard")  # after the remote reader's retries
# data.decode_device=cuda: samples the workers decoded themselves (not JPEGs the device decodes); not a loss
CPU_DECODED = "cpu_decoded"
SKIP_REASONS = SAMPLE_SKIP_REASONS + SHARD_LOSS_REASONS
LOGGED_BAD_SAMPLES_PER_WORKER = 5


@dataclass(frozen=True)
class Source:
    name: str
    urls: list[str]
    weight: float
    epochs: int | None = None  # passes over the shards, then the source leaves the mix
    max_samples: int | None = None  # raw samples over all (rank, worker) slots, then it leaves the mix
    keep_keys: frozenset[str] | None = None  # only samples with these keys are read (a curation keep list)

    @property
    def capped(self) -> bool:
        return self.epochs is not None or self.max_samples is not None

    def slot_share(self, slot: int, slots: int) -> int | None:
        """This slot's part of max_samples: the parts differ by at most one and add up to max_samples."""
        if self.max_samples is None:
            return None
        return self.max_samples // slots + (1 if slot < self.max_samples % slots else 0)


@dataclass(frozen=True)
class NaFlexSchedule:
    """Per-step sequence lengths (patches per image) for NaFlex batches, drawn by (seed, step)."""

    seq_lens: list[int]
    weights: list[float] | None = None

    def seq_len(self, seed: int, step: int) -> int:
        return seq_len_for_step(seed, step, self.seq_lens, self.weights)


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
    raw: RawSample, transform: Callable, image_size: int | None, *, decode_size: int | None = None,
    min_image_size: int = 1, require_caption: bool = True, pixels: bool = False,
    device_jpeg: Callable[[bytes], DeviceJpeg | None] | None = None,
) -> tuple[torch.Tensor | NaFlexImage | DeviceJpeg, str, int | None]:
    """(image, caption, label); `image_size` None: the transform sizes each image itself (NaFlex). `pixels`: the
    transform is handed uint8 (3, H, W) tensors instead of PIL images (transforms.decode_image). `device_jpeg`
    (data.decode_device=cuda): a JPEG it accepts is left undecoded for the trainer's device; others are decoded
    here."""
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
    left_to_device = device_jpeg(image_bytes) if device_jpeg is not None else None
    if left_to_device is not None:
        return left_to_device, caption, label
    image = transform(decode_image(image_bytes, decode_size or image_size, min_image_size, pixels))
    if image_size is None:
        return image, caption, label
    plain = image[0] if isinstance(image, tuple) else image  # a multi-view transform's plain view comes first
    if plain.shape[-2:] != (image_size, image_size):
        raise BadSample("wrong_image_size", f"transform gave {tuple(plain.shape)}")
    return image, caption, label


def _batch_tensor(shape: tuple[int, ...], in_worker: bool, dtype: torch.dtype = torch.uint8,
                  channels_last: bool = False) -> torch.Tensor:
    """A tensor for one batch (uint8 images; float32 for NaFlex patches, normalised in the workers), in shared memory
    inside a DataLoader worker (batch_memory.shared_tensor). `channels_last`: (B, C, H, W) laid out as (B, H, W, C),
    as the crops come out of the resize: writing one in is then a straight copy, not a transpose (which cost about as
    much as the resize). BatchNormalize hands the model contiguous planes."""
    if in_worker:
        return shared_tensor(shape, dtype, channels_last)
    memory = (shape[0], *shape[2:], shape[1]) if channels_last else shape
    tensor = torch.empty(memory, dtype=dtype)
    return tensor.permute(0, 3, 1, 2) if channels_last else tensor


class ImageTextStream(IterableDataset):
    """An infinite stream of local batches (see the module docstring for determinism and resume)."""

    def __init__(
        self,
        sources: list[Source],
        layout: StreamLayout,
        transform: Callable,
        tokenizer: Callable[[list[str]], torch.Tensor],
        image_size: int | None,  # None: NaFlex, each image sized by its step's sequence length
        local_batch_size: int,
        max_skip_fraction: float = 1.0,
        decode_size: int | None = None,
        min_image_size: int = 1,
        start_step: int = 0,
        positions: dict[int, StreamPosition] | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        bucket_batches: int | None = None,  # length bucketing over windows of this many local batches; None: off
        teacher_view: bool = False,  # the transform gives (student crop, teacher crop): transforms.TeacherViewCrops
        reinforced: tuple[str, ...] = (),  # read these teachers' stored targets; the transform is a StoredCrop
        naflex: NaFlexSchedule | None = None,
        # NaFlex: naflex.PatchNormalize, applied in the workers (padding patches must stay zero, which needs the mask)
        patch_normalize: Callable | None = None,
        # LocCa: each sample's boxes move with its crop and it gets a decoder task (transform must then be a
        # transforms.RandomCropFlip without flips)
        decoder_tasks: DecoderTasks | None = None,
        # data.decode_device=cuda: JPEGs it accepts are sent undecoded with their crops (Batch.jpeg_bytes)
        device_jpeg: DeviceJpegCrop | None = None,
    ) -> None:
        super().__init__()
        self.sources = sources
        self.layout = layout
        # (PIL image, generator it draws from) -> uint8 (3, H, W), or transforms.MultiViewCrops's tuple of views;
        # NaFlex: (PIL image, generator, max_patches) -> naflex.NaFlexImage
        self.transform = transform
        self.patch_normalize = patch_normalize
        self.decode_size = decode_size or image_size
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.local_batch_size = local_batch_size
        self.max_skip_fraction = max_skip_fraction
        self.min_image_size = min_image_size
        self.start_step = start_step
        self.positions = positions or {}
        self.retry = retry
        self.bucket_batches = bucket_batches
        self.teacher_view = teacher_view
        self.reinforced = reinforced
        self.naflex = naflex
        self.decoder_tasks = decoder_tasks
        self.device_jpeg = device_jpeg
        # set by batch_memory.StreamLoader before its workers start: they then reuse the images' shared memory
        self.batch_memory: BatchMemory | None = None

    def _source_samples(self, source: Source, worker: int, position: tuple[int, int, int], skipped: Counter,
                        capped: bool):
        """Yield (epoch, consumed in that epoch, taken in the run, raw sample) from `position` on; when `capped`,
        end at the source's epoch or sample cap, else loop forever."""
        layout = self.layout
        epoch, consumed, taken = position
        share = source.slot_share(layout.rank * layout.num_workers + worker, layout.world_size * layout.num_workers)
        for current_epoch in itertools.count(epoch):
            if capped and source.epochs is not None and current_epoch >= source.epochs:
                return
            urls = shards_for_slot(
                source.urls, epoch=current_epoch, rank=layout.rank, world_size=layout.world_size,
                worker=worker, num_workers=layout.num_workers, seed=layout.seed, resampled=layout.resampled,
            )
            # Broken shards are counted into `skipped` as the reader meets them, except while replaying a resumed
            # epoch up to its saved position: the saved counts hold what the reader met by then.
            shard_skips: Counter = Counter()
            counted: Counter = Counter()
            raw = self._read_shards(source.name, current_epoch, worker, urls, shard_skips)
            if source.keep_keys is not None:
                raw = (sample for sample in raw if sample["__key__"] in source.keep_keys)
            rng = random.Random(slot_seed(layout.seed, "shuffle", source.name, layout.rank, worker, current_epoch))
            yielded = False
            for index, sample in enumerate(shuffled(raw, layout.shuffle_buffer, rng)):
                yielded = True
                if current_epoch == epoch and index < consumed:
                    counted = Counter(shard_skips)
                    continue
                skipped.update(shard_skips - counted)
                counted = Counter(shard_skips)
                if capped and share is not None and taken >= share:
                    return
                taken += 1
                yield current_epoch, index + 1, taken, sample
            skipped.update(shard_skips - counted)
            if not yielded:
                raise InputError(f"data source {source.name!r} yielded no samples in a full pass over {urls[:3]}...")

    def _read_shards(self, source_name: str, epoch: int, worker: int, urls: list[str], shard_skips: Counter):
        """The raw samples of `urls` in order. More than max_skip_fraction of them lost (unreadable, or cut short
        after the remote reader's retries) stops the run, naming them: checked per (rank, worker) slot and epoch,
        where the count of shards is known up front and a resumed run meets the same shards again."""
        lost: list[str] = []
        for url in urls:
            before = sum(shard_skips[reason] for reason in SHARD_LOSS_REASONS)
            yield from iter_shard(url, shard_skips, self.retry)
            if sum(shard_skips[reason] for reason in SHARD_LOSS_REASONS) == before:
                continue
            lost.append(url)
            if len(lost) > self.max_skip_fraction * len(urls):
                raise InputError(
                    f"data source {source_name!r}: {len(lost)} of the {len(urls)} shards that rank {self.layout.rank} "
                    f"worker {worker} reads in epoch {epoch} were lost, more than data.max_skip_fraction="
                    f"{self.max_skip_fraction}: {', '.join(lost)}"
                )

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        loader_worker = info.id if info is not None else 0
        worker = (self.start_step + loader_worker) % self.layout.num_workers
        # A run whose every source is capped is finite; once all caps are met (bad samples made the shard
        # counts overstate the data, or prefetching reads past the planned last step) the sources go on uncapped.
        finite = all(s.capped for s in self.sources)
        position = self.positions.get(worker) or StreamPosition(
            worker=worker, sources={}, exhausted=(), past_plan=not finite, past_plan_samples=0, mixer_draws=0,
            skipped={}, samples_seen=0)
        skipped: Counter = Counter(position.skipped)
        seen = position.samples_seen
        source_positions = {s.name: position.sources.get(s.name, (0, 0, 0)) for s in self.sources}
        past_plan = position.past_plan
        past_plan_samples = position.past_plan_samples
        exhausted = set(position.exhausted)

        def open_streams() -> dict:
            return {s.name: self._source_samples(s, worker, source_positions[s.name], skipped, not past_plan)
                    for s in self.sources if s.name not in exhausted}

        streams = open_streams()
        mixer = random.Random(slot_seed(self.layout.seed, "mix", self.layout.rank, worker))
        mixer_draws = position.mixer_draws
        weights = {s.name: s.weight for s in self.sources}
        for _ in range(mixer_draws):  # one random() per draw whatever the weights, so replay needs only the count
            mixer.random()

        augment = torch.Generator()
        size = self.image_size
        window = self.local_batch_size * (self.bucket_batches or 1)  # samples gathered before batches are cut
        window_start, skip_batches = replace(position, bucket_batches_taken=0), position.bucket_batches_taken
        in_worker = info is not None
        # Without bucketing a window is one batch, so crops go straight into the memory it is sent in; with bucketing
        # the window buffer is reused and each batch is gathered out of it into memory of its own.
        window_in_shared_memory = in_worker and self.bucket_batches is None
        # Not with data.decode_device=cuda: the rows the device decodes are not written here, and a sample neither
        # decoder takes stays as the buffer has it, which must be black (fresh memory), not an older batch's pixels.
        ring = (ImageRing(self.batch_memory, loader_worker, (window, 3, size, size))
                if window_in_shared_memory and self.batch_memory is not None and self.naflex is None
                and self.device_jpeg is None else None)
        images, images_number = ((ring.take() if ring is not None
                                  else (_batch_tensor((window, 3, size, size), window_in_shared_memory,
                                                      channels_last=True), None))
                                 if self.naflex is None else (None, None))
        step = self.start_step + loader_worker  # the training step of this worker's next batch (NaFlex)
        sizing = {} if self.naflex is None else {"max_patches": self.naflex.seq_len(self.layout.seed, step)}
        naflex_images: list[NaFlexImage] = []
        view_buffers: tuple[torch.Tensor, ...] | None = None  # (window, G, 3, g, g), (window, L, 3, l, l)
        captions, labels, keys = [], [], []
        jpeg_bytes: list[bytes | None] = []  # data.decode_device=cuda, per sample
        jpeg_crops: list[tuple[int, int, int, int, bool]] = []
        stored_rows: list = []  # reinforced: per sample, teacher -> (image, text embedding as stored, scale, bias)
        decoder_texts: list[tuple[str, str, int]] = []  # (prompt, target, task) per sample, with decoder_tasks
        while True:
            active = [s.name for s in self.sources if s.name not in exhausted]
            if not active:
                log.debug("rank %d worker %d met every source cap; reading on past the plan", self.layout.rank, worker)
                past_plan, exhausted = True, set()
                streams = open_streams()
                continue
            name = mixer.choices(active, [weights[n] for n in active])[0]
            mixer_draws += 1
            try:
                epoch, consumed, taken, raw = next(streams[name])
            except StopIteration:
                exhausted.add(name)
                continue
            source_positions[name] = (epoch, consumed, taken)
            if past_plan and finite:
                past_plan_samples += 1
            try:
                # A generator of the stream's own, seeded by the sample's place in its source: the same sample gets
                # the same crop on a resume, and torch's global generator (which the model may draw from when
                # decoding runs in the training process) is never touched.
                augment.manual_seed(slot_seed(self.layout.seed, "augment", name, self.layout.rank, worker, epoch,
                                              consumed))
                transform = self.transform.crop_with_region if self.decoder_tasks is not None else self.transform
                transform = partial(transform, generator=augment, **sizing)
                decode_size = self.decode_size
                if self.reinforced:  # one of the stored augmentations, drawn from the sample's generator
                    stored = read_sample_files(raw, self.reinforced)
                    choice = int(torch.randint(len(stored.boxes), (1,), generator=augment))
                    params = stored.augmentation(choice)
                    transform = partial(self.transform, params=params, source_size=stored.source_size)
                    # JPEGs draft-decoded just large enough for this box at the student's size (StoredCrop scales it)
                    decode_size = stored_decode_size([params], stored.source_size, self.image_size)
                # crop transforms take uint8 tensors (transforms.as_pixels); NaFlex's resize takes PIL images
                image, caption, label = decode_sample(raw, transform, self.image_size,
                                                      decode_size=decode_size, min_image_size=self.min_image_size,
                                                      pixels=self.naflex is None, device_jpeg=None
                                                      if self.device_jpeg is None
                                                      else partial(self.device_jpeg, generator=augment))
                if self.decoder_tasks is not None:
                    image, region = image
                    boxes, phrases = read_boxes(raw.get("json"))
                    moved, kept = crop_boxes(boxes, region, self.image_size)
                    kept_phrases = [phrase for phrase, keep in zip(phrases, kept.tolist()) if keep]
                    decoder_text = self.decoder_tasks(caption, moved[kept], kept_phrases, augment)
            except BadSample as bad:
                skipped[bad.reason] += 1
                self._check_skip_rate(skipped, seen, raw, bad)
                continue
            seen += 1
            if isinstance(image, tuple):
                image, *views = image
                if view_buffers is None:
                    view_buffers = tuple(_batch_tensor((window, *v.shape), window_in_shared_memory) for v in views)
                for buffer, view in zip(view_buffers, views):
                    buffer[len(keys)] = view
            if self.device_jpeg is not None:
                left_to_device = isinstance(image, DeviceJpeg)
                jpeg_bytes.append(image.data if left_to_device else None)
                jpeg_crops.append(image.crop if left_to_device else (0, 0, 0, 0, False))
                if not left_to_device:
                    skipped[CPU_DECODED] += 1
            if self.naflex is not None:
                naflex_images.append(image)
            elif not isinstance(image, DeviceJpeg):  # the device writes those rows
                images[len(keys)] = image
            if self.reinforced:
                stored_rows.append({name: (stored.image_embeddings[name][choice], stored.text_embeddings[name],
                                           stored.logit_scales[name], stored.logit_biases[name])
                                    for name in self.reinforced})
            captions.append(caption)
            labels.append(-1 if label is None else label)
            keys.append(str(raw["__key__"]))
            if self.decoder_tasks is not None:
                decoder_texts.append(decoder_text)
            if len(keys) < window:
                continue
            window_end = StreamPosition(
                worker=worker, sources=dict(source_positions), exhausted=tuple(sorted(exhausted)),
                past_plan=past_plan, past_plan_samples=past_plan_samples, mixer_draws=mixer_draws,
                skipped=dict(skipped), samples_seen=seen,
            )
            if self.naflex is not None:
                packed = pack(naflex_images, sizing["max_patches"])
                yield Batch(
                    images=self.patch_normalize(packed.patches, packed.valid,
                                                out=_batch_tensor(packed.patches.shape, in_worker,
                                                                  torch.float32)),
                    patch_coord=packed.coord, patch_valid=packed.valid,
                    tokens=self.tokenizer(captions), keys=keys, labels=torch.tensor(labels),
                    stream_position=window_end,
                )
                step += self.layout.num_workers
                sizing = {"max_patches": self.naflex.seq_len(self.layout.seed, step)}
                naflex_images = []
            elif self.bucket_batches is None:
                views = view_buffers or ()
                yield Batch(
                    # from a ring: a RingImages until the DataLoader worker pickles the batch (the buffer again after)
                    images=images if ring is None else ring.sendable(images_number),
                    global_views=views[0] if views and not self.teacher_view else None,
                    local_views=views[1] if len(views) > 1 else None,
                    # uint8: each teacher resizes and normalises its view its own way (transforms.teacher_input)
                    teacher_images=views[0] if self.teacher_view else None,
                    tokens=self.tokenizer(captions), keys=keys, labels=torch.tensor(labels),
                    stream_position=window_end, captions=captions,
                    teachers=self._stored_targets(stored_rows),
                    jpeg_bytes=jpeg_bytes, jpeg_crops=jpeg_crops,
                    **self._decoder_fields(decoder_texts),
                    shared_images=None if ring is None else (loader_worker, images_number),
                )
                # sent: the next batch's images go elsewhere (a released ring buffer, or fresh memory)
                images, images_number = (ring.take() if ring is not None else
                                         (_batch_tensor(images.shape, window_in_shared_memory, channels_last=True),
                                          None))
                view_buffers = None
            else:
                yield from self._length_buckets(images, captions, labels, keys, window_start, window_end,
                                                skip_batches, in_worker)
            window_start, skip_batches = window_end, 0
            captions, labels, keys, stored_rows, decoder_texts = [], [], [], [], []
            jpeg_bytes, jpeg_crops = [], []

    def _stored_targets(self, rows: list[dict]) -> dict[str, TeacherTargets]:
        """A batch's stored teacher targets (reinforced data), teacher -> TeacherTargets. In plain memory: sent from a
        DataLoader worker, tensors up to types.BY_VALUE_BYTES travel inside the batch's pickle."""
        targets = {}
        for name in self.reinforced if rows else ():
            image, text, scale, bias = zip(*(row[name] for row in rows))
            targets[name] = TeacherTargets(
                image_features=normalized_rows(image),
                text_features=None if text[0] is None else normalized_rows(text),
                logit_scale=None if scale[0] is None else torch.tensor(scale[0], dtype=torch.float32),
                logit_bias=None if bias[0] is None else torch.tensor(bias[0], dtype=torch.float32))
        return targets

    def _decoder_fields(self, decoder_texts: list[tuple[str, str, int]]) -> dict[str, torch.Tensor]:
        """Batch.decoder_tokens, decoder_prompt_lengths and decoder_tasks, when the stream draws decoder tasks."""
        if not decoder_texts:
            return {}
        prompts, targets, tasks = zip(*decoder_texts)
        tokens, prompt_lengths = tokenize_decoder_texts(self.tokenizer, list(prompts), list(targets))
        return {"decoder_tokens": tokens, "decoder_prompt_lengths": prompt_lengths,
                "decoder_tasks": torch.tensor(tasks)}

    def _length_buckets(self, images: torch.Tensor, captions: list[str], labels: list[int], keys: list[str],
                        start: StreamPosition, end: StreamPosition, skip: int, in_worker: bool) -> Iterator[Batch]:
        """A window's samples as batches of similar caption lengths, each padded to its own longest caption."""
        tokens = self.tokenizer(captions)  # (window, L), 0 = padding
        lengths = (tokens != 0).sum(dim=1)
        order = sorted(range(len(keys)), key=lambda index: (int(lengths[index]), index))
        batches = [order[i:i + self.local_batch_size] for i in range(0, len(order), self.local_batch_size)]
        # Shuffled, so that no run of steps sees only short or only long captions.
        random.Random(slot_seed(self.layout.seed, "buckets", self.layout.rank, end.worker, start.samples_seen,
                                start.mixer_draws)).shuffle(batches)
        for number, members in enumerate(batches):
            if number < skip:
                continue
            rows = torch.tensor(members)
            width = int(lengths[rows].max())
            yield Batch(
                images=torch.index_select(images, 0, rows, out=_batch_tensor((len(members), *images.shape[1:]),
                                                                             in_worker, channels_last=True)),
                tokens=tokens[rows, :width].contiguous(), keys=[keys[i] for i in members],
                captions=[captions[i] for i in members],
                labels=torch.tensor([labels[i] for i in members]),
                stream_position=end if number == len(batches) - 1 else replace(start, bucket_batches_taken=number + 1),
            )

    def _check_skip_rate(self, skipped: Counter, seen: int, raw: RawSample, bad: BadSample) -> None:
        total_skipped = sum(skipped[reason] for reason in SKIP_REASONS)
        if total_skipped <= LOGGED_BAD_SAMPLES_PER_WORKER:
            log.warning("skipping sample %s from %s: %s", raw.get("__key__"), raw.get("__url__"), bad)
        total = total_skipped + seen
        if total >= MIN_SAMPLES_FOR_SKIP_CHECK and total_skipped > self.max_skip_fraction * total:
            raise InputError(
                f"{total_skipped} of {total} samples were bad ({dict(skipped)}), more than "
                f"data.max_skip_fraction={self.max_skip_fraction}; check the shards (contrastive-data inspect)"
            )
