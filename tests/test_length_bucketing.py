"""data.length_bucketing: windows of local batches regrouped by caption token count, each batch padded only to its
own longest caption, and exact resume from a batch inside a window. Checked against captions read from the shards
directly and tokenized by open_clip."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import open_clip
import torch

from contrastive.data.loader import build_train_loader
from contrastive.encoders import preprocess_from_config
from contrastive.models import build_tokenizer
from contrastive.types import StreamPosition
from tests.conftest import compose_config, tiny_run_overrides

WINDOW = 4  # data.bucket_batches


def _batches(demo_root: Path, count: int, *overrides: str, positions=None) -> list:
    cfg = compose_config([*tiny_run_overrides(demo_root, demo_root / "unused"), "data.batch_size=16", *overrides])
    loader = build_train_loader(cfg.data, preprocess_from_config(cfg.model), build_tokenizer(cfg.model), rank=0,
                                world_size=1, seed=0, positions=positions)
    batches = iter(loader)
    return [next(batches) for _ in range(count)]


def _captions(demo_root: Path) -> dict[str, str]:
    captions = {}
    for shard in sorted((demo_root / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    captions[member.name[:-4]] = tar.extractfile(member).read().decode()
    return captions


def test_batches_group_similar_lengths_and_pad_to_their_own_longest(demo_root):
    plain = _batches(demo_root, 2 * WINDOW)
    bucketed = _batches(demo_root, 2 * WINDOW, "data.length_bucketing=true", f"data.bucket_batches={WINDOW}")
    captions, tokenizer = _captions(demo_root), open_clip.SimpleTokenizer(context_length=16)
    for window in range(2):  # the same samples as the unbucketed stream's window, regrouped
        part = slice(window * WINDOW, (window + 1) * WINDOW)
        assert Counter(k for b in bucketed[part] for k in b.keys) == Counter(k for b in plain[part] for k in b.keys)
        ranges = sorted((int((b.tokens != 0).sum(1).min()), int((b.tokens != 0).sum(1).max())) for b in bucketed[part])
        assert all(low_max <= high_min for (_, low_max), (high_min, _) in zip(ranges, ranges[1:]))
    for batch in bucketed:
        expected = tokenizer([captions[key] for key in batch.keys])
        width = int((expected != 0).sum(1).max())
        assert torch.equal(batch.tokens, expected[:, :width])
    padding = [float((b.tokens == 0).float().mean()) for b in bucketed]
    assert sum(padding) / len(padding) < 0.5 * float(torch.cat([b.tokens for b in plain]).eq(0).float().mean())


def test_resume_inside_a_window_continues_with_the_same_batches(demo_root):
    bucketing = ["data.length_bucketing=true", f"data.bucket_batches={WINDOW}"]
    straight = _batches(demo_root, 2 * WINDOW + 2, *bucketing)
    for resume_after in (1, WINDOW - 1, WINDOW + 2):  # the second batch of a window, its last, one in the next
        position = StreamPosition.from_dict(straight[resume_after].stream_position.to_dict())  # as checkpointed
        resumed = _batches(demo_root, 3, *bucketing, positions={position.worker: position})
        for got, expected in zip(resumed, straight[resume_after + 1:]):
            assert got.keys == expected.keys
            assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.images, expected.images)
