"""Mixing several sources, caps and upsampling, finite epoch-mode runs (same last step on every rank), shard URLs,
and every kind of bad sample."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from contrastive.data.plan import count_shard_samples, plan_finite_run
from contrastive.data.stream import ImageTextStream, Source, StreamLayout
from contrastive.data.transforms import build_train_transform
from contrastive.models import build_tokenizer
from tests.conftest import compose_config, torchrun
from tests.data_factory import bad_shard_set, good_samples, write_tar

MIXING_TOLERANCE = 0.03  # absolute, on a source's share of 2000 draws (binomial sd is about 0.01)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(compose_config(["model=test_tiny"]).model)


def _stream(sources, tokenizer, *, rank=0, world_size=1, num_workers=1, resampled=False, batch=4, start_step=0,
            positions=None, shuffle_buffer=8):
    layout = StreamLayout(rank=rank, world_size=world_size, num_workers=num_workers, seed=3, resampled=resampled,
                          shuffle_buffer=shuffle_buffer)
    return ImageTextStream(sources, layout, build_train_transform(28),
                           tokenizer, 28, batch, min_image_size=8, start_step=start_step, positions=positions)


def _batches(stream, count, num_workers=0):
    iterator = iter(DataLoader(stream, batch_size=None, num_workers=num_workers))
    return [next(iterator) for _ in range(count)]


def _shards(root, prefix, sizes):
    root.mkdir(parents=True, exist_ok=True)
    return [str(write_tar(root / f"{prefix}{i}.tar", good_samples(f"{prefix}{i}_", size)))
            for i, size in enumerate(sizes)]


def test_mixing_weights_are_honoured_within_tolerance(tmp_path, tokenizer):
    sources = [Source("big", _shards(tmp_path, "big", [60, 60]), 0.7),
               Source("small", _shards(tmp_path, "small", [40]), 0.3)]
    batches = _batches(_stream(sources, tokenizer, resampled=True, batch=50), 40)
    keys = [key for batch in batches for key in batch.keys]
    share = sum(key.startswith("big") for key in keys) / len(keys)
    assert len(keys) == 2000 and abs(share - 0.7) < MIXING_TOLERANCE, share


def test_capped_and_upsampled_sources_give_exactly_their_share(tmp_path, tokenizer):
    """A source capped at 30 of its 40 samples and one upsampled to 2 epochs: 50 samples, 10 batches of 5."""
    sources = [Source("capped", _shards(tmp_path, "capped", [40]), 1.0, max_samples=30),
               Source("upsampled", _shards(tmp_path, "up", [10]), 1.0, epochs=2)]
    plan = plan_finite_run(sources, world_size=1, num_workers=1, seed=3, resampled=False, local_batch_size=5)
    assert (plan.steps, plan.planned_samples, plan.leftover_samples) == (10, 50, 0)
    straight = _batches(_stream(sources, tokenizer, batch=5), plan.steps)
    keys = Counter(key for batch in straight for key in batch.keys)
    assert sum(1 for key in keys if key.startswith("capped")) == 30 and set(keys.values()) == {1, 2}
    assert all(count == 2 for key, count in keys.items() if key.startswith("up"))
    assert straight[-1].stream_position.past_plan_samples == 0
    for k in (3, 7):  # resume before and after a source meets its cap
        positions = {0: straight[k - 1].stream_position}
        resumed = _batches(_stream(sources, tokenizer, batch=5, start_step=k, positions=positions), plan.steps - k)
        assert [b.keys for b in resumed] == [b.keys for b in straight[k:]]


def test_finite_epoch_run_with_uneven_shards_stops_every_rank_at_the_same_step(tmp_path, tokenizer):
    """2 ranks x 2 workers over shards of different sizes: the planned steps use each key at most once, every
    rank can take them, and the keys left unused are exactly the stated leftover."""
    sizes = [10, 23, 7, 13, 9, 11, 15, 5]
    shards = _shards(tmp_path, "s", sizes)
    sources = [Source("web", shards, 1.0, epochs=1)]
    plan = plan_finite_run(sources, world_size=2, num_workers=2, seed=3, resampled=False, local_batch_size=4)
    assert plan.planned_samples == sum(sizes) and len(plan.rank_steps) == 2
    assert plan.steps == min(plan.rank_steps) and plan.steps > 0
    seen: Counter = Counter()
    for rank in range(2):
        batches = _batches(_stream(sources, tokenizer, rank=rank, world_size=2, num_workers=2), plan.steps, 2)
        assert all(batch.stream_position.past_plan_samples == 0 for batch in batches)
        seen.update(key for batch in batches for key in batch.keys)
    assert set(seen.values()) == {1}
    assert sum(sizes) - len(seen) == plan.leftover_samples == sum(sizes) - plan.steps * 4 * 2


def test_pipe_urls_read_like_local_paths(tmp_path, tokenizer):
    shards = _shards(tmp_path, "p", [12, 12])
    piped = [f"pipe:cat {shard}" for shard in shards]
    assert [count_shard_samples(url) for url in piped] == [12, 12]
    local = _batches(_stream([Source("web", shards, 1.0)], tokenizer, num_workers=2), 6)
    remote = _batches(_stream([Source("web", piped, 1.0)], tokenizer, num_workers=2), 6)
    assert [b.keys for b in local] == [b.keys for b in remote]


def test_every_kind_of_bad_sample_is_skipped_and_counted(tmp_path, tokenizer):
    shards, expected, good = bad_shard_set(tmp_path)
    shards[-1] = f"pipe:cat {shards[-1]}"  # an opener that fails, not just a missing path
    stream = _stream([Source("web", shards, 1.0, epochs=1)], tokenizer, batch=good, shuffle_buffer=0)
    batch = _batches(stream, 1)[0]
    assert len(set(batch.keys)) == good
    assert batch.stream_position.skipped == expected
    assert batch.stream_position.past_plan_samples == 0


@pytest.mark.distributed
def test_finite_epoch_run_under_torchrun_sees_each_key_once_and_states_the_leftover(tmp_path):
    sizes = [10, 23, 7, 13, 9, 11, 15, 5]
    _shards(tmp_path / "shards", "t", sizes)
    out = tmp_path / "figures.json"
    torchrun(["tests/dist_scripts/data_epoch_keys.py", str(tmp_path / "shards"), str(sum(sizes)), str(out)], nproc=2)
    figures = json.loads(out.read_text())
    assert figures["steps"][0] == figures["steps"][1] > 0, "every rank stops at the same step"
    assert figures["repeats"] == 0 and figures["past_plan"] == 0
    assert figures["unseen"] == figures["leftover"] == sum(sizes) - figures["steps"][0] * 8


def _positions_before(batches: list, k: int) -> dict:
    """The per-worker positions a checkpoint after step k holds: each worker's latest batch state."""
    positions = {}
    for batch in batches[:k]:
        positions[batch.stream_position.worker] = batch.stream_position
    return positions


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_the_epoch_wraps_reproduces_a_finite_multi_epoch_run(tmp_path, tokenizer, num_workers):
    sources = [Source("web", _shards(tmp_path, "w", [9, 7, 11, 5]), 1.0, epochs=3)]  # 32 samples, 3 passes
    slots = max(1, num_workers)
    stream = lambda **kw: _stream(sources, tokenizer, num_workers=slots, batch=4, **kw)
    steps = plan_finite_run(sources, world_size=1, num_workers=slots, seed=3, resampled=False,
                            local_batch_size=4).steps
    straight = _batches(stream(), steps, num_workers)
    keys = Counter(key for batch in straight for key in batch.keys)
    assert len(keys) == 32 and set(keys.values()) <= {2, 3}  # 3 passes, less what the slots' last batches leave
    epochs = [batch.stream_position.sources["web"][0] for batch in straight]
    first_wrap = epochs.index(1)
    for k in (first_wrap + 1, first_wrap + 5):  # resumed just after, and well after, the first epoch boundary
        resumed = _batches(stream(start_step=k, positions=_positions_before(straight, k)), steps - k, num_workers)
        assert [b.keys for b in resumed] == [b.keys for b in straight[k:]], k
        assert all(torch.equal(a.images, b.images) for a, b in zip(resumed, straight[k:])), "augmentation differs"


def test_resume_with_weighted_sources_continues_the_same_key_sequence(tmp_path, tokenizer):
    sources = [Source("big", _shards(tmp_path, "big", [30, 30]), 0.7),
               Source("small", _shards(tmp_path, "sm", [12]), 0.3)]
    straight = _batches(_stream(sources, tokenizer, batch=5), 16)
    small_epochs = [batch.stream_position.sources["small"][0] for batch in straight]
    assert max(small_epochs) >= 1, "the small source must wrap inside the run"
    for k in (3, small_epochs.index(1) + 1):
        resumed = _batches(_stream(sources, tokenizer, batch=5, start_step=k, positions=_positions_before(straight, k)),
                           16 - k)
        assert [b.keys for b in resumed] == [b.keys for b in straight[k:]], k
    mixed = [key for batch in straight for key in batch.keys]
    assert {key[:2] for key in mixed} == {"bi", "sm"}
