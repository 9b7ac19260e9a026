"""Builds the DataLoaders the trainer and evaluators use, from the data config and the model's `Preprocess`."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from contrastive.config import DataConfig, LoccaConfig
from contrastive.data.batch_memory import StreamLoader
from contrastive.data.boxes import DecoderTasks
from contrastive.data.naflex import NaFlexResize, PatchNormalize
from contrastive.data.plan import RunPlan, plan_finite_run
from contrastive.data.reader import iter_shard
from contrastive.data.remote import RECOVERED_READ, RetryPolicy
from contrastive.data.shards import check_epoch_mode_slots, check_shards_exist, expand_shards
from contrastive.data.stream import ImageTextStream, NaFlexSchedule, Source, StreamLayout, decode_sample
from contrastive.data.transforms import (
    BadSample,
    DeviceJpegCrop,
    MultiViewCrops,
    Preprocess,
    StoredCrop,
    TeacherViewCrops,
    build_train_transform,
    naflex_decode_size,
    train_decode_size,
)
from contrastive.errors import ConfigError, InputError
from contrastive.types import StreamPosition

log = logging.getLogger(__name__)


def read_keep_list(path: str | None, source_name: str, resampled: bool) -> frozenset[str] | None:
    if path is None:
        return None
    if not resampled:
        raise ConfigError(f"data source {source_name!r}: keep_list needs data.resampled=true (an epoch plan counts "
                          "whole shards); for epoch passes write the kept samples as shards (contrastive-data filter)")
    try:
        keys = frozenset(line.strip() for line in Path(path).read_text().splitlines() if line.strip())
    except OSError as error:
        raise InputError(f"data source {source_name!r}: cannot read keep_list {path}: {error}") from None
    if not keys:
        raise InputError(f"data source {source_name!r}: keep_list {path} holds no keys")
    return keys


def build_sources(data: DataConfig) -> list[Source]:
    sources = []
    for source in data.sources:
        urls = expand_shards(source.shards)
        check_shards_exist(urls, source.name)
        epochs = source.epochs if source.epochs is not None else data.epochs
        sources.append(Source(source.name, urls, source.weight, epochs, source.max_samples,
                              read_keep_list(source.keep_list, source.name, data.resampled)))
    return sources


def plan_run(data: DataConfig, *, world_size: int, seed: int) -> RunPlan | None:
    """The agreed last step of a finite run (see contrastive.data.plan); None for an endless stream."""
    plan = plan_finite_run(build_sources(data), world_size=world_size, num_workers=max(1, data.num_workers),
                           seed=seed, resampled=data.resampled, local_batch_size=data.batch_size // world_size)
    if plan is not None:
        log.info("finite run: %d steps use %d of the %d planned samples; %d left over (slots holding more samples "
                 "than the slowest one)", plan.steps, plan.steps * data.batch_size, plan.planned_samples,
                 plan.leftover_samples)
    return plan


def build_train_loader(
    data: DataConfig,
    preprocess: Preprocess,
    tokenizer: Callable[[list[str]], torch.Tensor],
    *,
    rank: int,
    world_size: int,
    seed: int,
    start_step: int = 0,
    positions: dict[int, StreamPosition] | None = None,
    pin_memory: bool = False,
    teacher_view: tuple[int, str] | None = None,
    reinforced: tuple[str, ...] = (),
    locca: LoccaConfig | None = None,
) -> DataLoader:
    """`teacher_view` (distillation with online teachers): (size, interpolation) of the teachers' crop of each
    student augmentation (Batch.teacher_images). `reinforced`: read these teachers' stored targets and replay one of
    each sample's stored augmentations instead of drawing a new one. `locca`: draw each sample's LocCa decoder
    task (boxes move with the crop; loss=siglip_locca)."""
    device_decode = data.decode_device == "cuda"
    if device_decode:
        _check_device_decode(data, teacher_view is not None or bool(reinforced) or locca is not None)
    sources = build_sources(data)
    image_size = preprocess.image_size
    transform = build_train_transform(
        image_size, preprocess.interpolation, crop_scale=tuple(data.crop_scale), horizontal_flip=data.horizontal_flip,
    )
    decode_size = train_decode_size(image_size, tuple(data.crop_scale))
    if data.global_views or data.local_views:
        global_size = data.global_view_size or image_size
        # DINO's views: random resized crops with flips, global ones large, local ones small
        views = [(global_size, data.global_view_scale), (data.local_view_size, data.local_view_scale)]
        global_crop, local_crop = (build_train_transform(size, preprocess.interpolation, tuple(scale), True)
                                   for size, scale in views)
        transform = MultiViewCrops(transform, global_crop, data.global_views, local_crop, data.local_views)
        decode_size = max(decode_size, *(train_decode_size(size, tuple(scale)) for size, scale in views))
    if teacher_view is not None:
        transform = TeacherViewCrops(transform, *teacher_view)
        decode_size = max(decode_size, train_decode_size(teacher_view[0], tuple(data.crop_scale)))
    if reinforced:
        transform = StoredCrop(image_size, preprocess.interpolation)  # the stream sets each sample's decode size
    naflex = patch_normalize = None
    if data.naflex_seq_lens:
        if preprocess.patch_size is None:
            raise ConfigError("data.naflex_seq_lens needs a NaFlex image tower (model.vision.timm_model_name "
                              "naflexvit_*)")
        transform = NaFlexResize(preprocess.patch_size, preprocess.interpolation, data.horizontal_flip)
        patch_normalize = PatchNormalize(preprocess.mean, preprocess.std, preprocess.patch_size)
        naflex = NaFlexSchedule(list(data.naflex_seq_lens), list(data.naflex_seq_len_weights) or None)
        decode_size = naflex_decode_size(preprocess.patch_size, max(data.naflex_seq_lens))
        image_size = None
    layout = StreamLayout(
        rank=rank, world_size=world_size, num_workers=max(1, data.num_workers), seed=seed,
        resampled=data.resampled, shuffle_buffer=data.shuffle_buffer,
    )
    if not data.resampled:
        for source in sources:  # fail now, not inside a worker
            check_epoch_mode_slots(len(source.urls), world_size, layout.num_workers, source.name)
    stream = ImageTextStream(
        sources, layout, transform, tokenizer,
        image_size, data.batch_size // world_size, max_skip_fraction=data.max_skip_fraction,
        decode_size=decode_size, min_image_size=data.min_image_size,
        start_step=start_step, positions=positions,
        retry=RetryPolicy(attempts=data.read_attempts, first_wait_s=data.retry_wait_s),
        bucket_batches=data.bucket_batches if data.length_bucketing else None, naflex=naflex,
        patch_normalize=patch_normalize,
        teacher_view=teacher_view is not None, reinforced=reinforced,
        decoder_tasks=None if locca is None else DecoderTasks(
            (locca.caption, locca.referring, locca.grounded_caption), locca.location_bins, image_size),
        device_jpeg=DeviceJpegCrop(transform, decode_size, data.min_image_size) if device_decode else None,
    )
    return StreamLoader(stream, num_workers=data.num_workers, pin_memory=pin_memory)


def _check_device_decode(data: DataConfig, teachers_or_boxes: bool) -> None:
    """data.decode_device=cuda: a CUDA device, and the plain crop path (one random resized crop per sample)."""
    if not torch.cuda.is_available():
        raise ConfigError("data.decode_device=cuda needs a CUDA device, and torch sees none "
                          "(torch.cuda.is_available() is False): use data.decode_device=cpu")
    if (data.naflex_seq_lens or data.global_views or data.local_views or data.length_bucketing
            or teachers_or_boxes):
        raise ConfigError("data.decode_device=cuda decodes the plain random resized crop only: it does not combine "
                          "with data.naflex_seq_lens, data.global_views/local_views, data.length_bucketing, "
                          "distillation teachers or LocCa boxes (use data.decode_device=cpu)")


class LabelledShards(IterableDataset):
    """Every sample of a fixed shard list once, in order (for evaluation): (image, caption, label, key)."""

    def __init__(self, urls: list[str], transform: Callable, image_size: int | None,
                 decode_size: int | None = None) -> None:
        super().__init__()
        self.urls = urls
        self.transform = transform
        self.image_size = image_size  # None: the transform sizes each image (NaFlex)
        self.decode_size = decode_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str, int, str]]:
        info = get_worker_info()
        urls = self.urls if info is None else self.urls[info.id :: info.num_workers]
        skipped: Counter = Counter()
        for url in urls:
            for raw in iter_shard(url, skipped):
                try:
                    image, caption, label = decode_sample(raw, self.transform, self.image_size,
                                                          decode_size=self.decode_size, require_caption=False)
                except BadSample as bad:
                    # Skipping would change the denominator of every metric, so evaluation refuses bad data.
                    raise InputError(f"bad evaluation sample {raw['__key__']} in {url}: {bad}") from bad
                yield image, caption, -1 if label is None else label, str(raw["__key__"])
        skipped.pop(RECOVERED_READ, None)  # a remote read a retry fixed lost nothing
        if skipped:
            raise InputError(f"evaluation shards are damaged: {dict(skipped)} in {urls}")


def build_eval_loader(urls: list[str], preprocess: Preprocess, batch_size: int, num_workers: int = 0) -> DataLoader:
    check_shards_exist(urls, "evaluation")
    dataset = LabelledShards(urls, preprocess.transform(), preprocess.checked_size, preprocess.decode_size)
    return DataLoader(dataset, batch_size=batch_size, num_workers=min(num_workers, len(urls)))
