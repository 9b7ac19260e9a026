"""Reading every sample of a shard set once with the training stream's checks, to describe it and find bad data."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from contrastive.data.boxes import read_boxes
from contrastive.data.reader import iter_shard
from contrastive.data.remote import RECOVERED_READ
from contrastive.data.stream import SHARD_LOSS_REASONS, decode_sample
from contrastive.data.transforms import BadSample

FULL_SIZE = 1 << 30  # a decode size no image reaches: decode at full resolution, as the strictest check
BAD_SAMPLES_LISTED = 50


@dataclass
class ShardReport:
    shards: int = 0
    samples: int = 0  # readable samples, good or bad
    good: int = 0
    extensions: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # by reason, as the training stream counts them
    bad_samples: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, key, reason), first few
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    caption_chars: list[int] = field(default_factory=list)
    samples_per_shard: dict[str, int] = field(default_factory=dict)  # readable samples of each shard read whole
    recovered_reads: int = 0  # remote reads that failed and succeeded on a retry
    # GRIT-style boxes in the json (contrastive.data.boxes), over the good samples
    boxes_per_sample: list[int] = field(default_factory=list)
    box_area_shares: list[float] = field(default_factory=list)  # each box's area over its image's
    boxes_past_the_image: int = 0  # boxes reaching beyond the image's edges (the crop clips them)

    @property
    def ok(self) -> bool:
        return not self.skipped

    def summary(self) -> list[str]:
        lines = [f"shards: {self.shards}", f"samples: {self.samples} ({self.good} good)",
                 "extensions: " + ", ".join(f"{ext} {count}" for ext, count in self.extensions.most_common())]
        for name, values in (("image width", self.widths), ("image height", self.heights),
                             ("caption characters", self.caption_chars)):
            if values:
                lines.append(f"{name}: min {min(values)}, median {statistics.median(values):g}, max {max(values)}")
        counts = [count for count in self.boxes_per_sample if count]
        if counts:
            lines.append(f"samples with boxes: {len(counts)} of {len(self.boxes_per_sample)}; boxes per sample with "
                         f"boxes: min {min(counts)}, median {statistics.median(counts):g}, max {max(counts)}")
            lines.append(f"box area / image area: min {min(self.box_area_shares):.3g}, median "
                         f"{statistics.median(self.box_area_shares):.3g}, max {max(self.box_area_shares):.3g}; "
                         f"boxes past the image's edges: {self.boxes_past_the_image}")
        if self.skipped:
            lines.append("bad: " + ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items())))
            lines += [f"  {shard} {key}: {reason}" for shard, key, reason in self.bad_samples]
            if sum(self.skipped.values()) > len(self.bad_samples):
                lines.append(f"  ... ({sum(self.skipped.values()) - len(self.bad_samples)} more not listed)")
        else:
            lines.append("bad: none")
        if self.recovered_reads:
            lines.append(f"remote reads recovered by a retry: {self.recovered_reads}")
        return lines


def inspect_shards(urls: Iterable[str], min_image_size: int = 1, progress: bool = True) -> ShardReport:
    urls = list(urls)
    report = ShardReport(shards=len(urls))
    placeholder = torch.empty(0, 1, 1)

    def measure(image):
        report.widths.append(image.size[0])
        report.heights.append(image.size[1])
        return placeholder

    for url in tqdm(urls, desc="shards", unit="shard", disable=not progress):
        shard_counts: Counter = Counter()  # shard losses and recovered reads, as the reader counts them
        samples_before = report.samples
        for raw in iter_shard(url, shard_counts):
            report.samples += 1
            report.extensions.update(key for key in raw if not key.startswith("__"))
            try:
                _, caption, _ = decode_sample(raw, measure, 1, decode_size=FULL_SIZE, min_image_size=min_image_size)
                boxes, _ = read_boxes(raw.get("json"))
            except BadSample as bad:
                report.skipped[bad.reason] += 1
                _note_bad(report, url, str(raw["__key__"]), bad.reason)
                continue
            report.good += 1
            report.caption_chars.append(len(caption))
            width, height = report.widths[-1], report.heights[-1]
            report.boxes_per_sample.append(len(boxes))
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            report.box_area_shares += (areas / (width * height)).tolist()
            report.boxes_past_the_image += int(((boxes[:, :2] < 0).any(1) | (boxes[:, 2] > width)
                                                | (boxes[:, 3] > height)).sum())
        report.recovered_reads += shard_counts.pop(RECOVERED_READ, 0)
        for reason in SHARD_LOSS_REASONS:
            if shard_counts[reason]:
                _note_bad(report, url, "-", reason)
        report.skipped.update(shard_counts)
        if not any(shard_counts.values()):
            report.samples_per_shard[url] = report.samples - samples_before
    report.skipped = Counter({reason: count for reason, count in report.skipped.items() if count})
    return report


def _note_bad(report: ShardReport, url: str, key: str, reason: str) -> None:
    if len(report.bad_samples) < BAD_SAMPLES_LISTED:
        report.bad_samples.append((url, key, reason))
