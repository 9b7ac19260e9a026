"""Reused shared memory for image batches (contrastive.data.batch_memory): a worker writes a buffer again only after the
main process released the batch last sent in it, so every batch a consumer holds keeps its pixels. The reference is
the same stream through a plain DataLoader, whose workers take fresh shared memory for every batch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from contrastive.data.batch_memory import BatchMemory, ImageRing, StreamLoader
from contrastive.data.shards import expand_shards
from contrastive.data.stream import ImageTextStream, Source, StreamLayout
from contrastive.data.transforms import build_train_transform
from contrastive.models import build_tokenizer
from tests.conftest import compose_config

BATCHES = 16  # with 2 workers, 8 each: past the ring's 6 buffers, so buffers are written again


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(compose_config(["model=test_tiny"]).model)


def _stream(demo_root, tokenizer) -> ImageTextStream:
    layout = StreamLayout(rank=0, world_size=1, num_workers=2, seed=3, resampled=True, shuffle_buffer=20)
    return ImageTextStream([Source("demo", expand_shards(str(demo_root / "train")), 1.0)], layout,
                           build_train_transform(28), tokenizer, 28, 8)


def _held(loader) -> list:
    iterator = iter(loader)
    return [next(iterator) for _ in range(BATCHES)]  # every batch kept while later ones arrive


@pytest.fixture(scope="module")
def reference(demo_root, tokenizer) -> list:
    return _held(DataLoader(_stream(demo_root, tokenizer), batch_size=None, num_workers=2))


def test_batches_a_consumer_keeps_keep_their_pixels_while_the_workers_reuse_memory(demo_root, tokenizer, reference):
    stream = _stream(demo_root, tokenizer)
    held = _held(StreamLoader(stream, num_workers=2, prefetch_factor=2))
    assert [b.keys for b in held] == [b.keys for b in reference]
    for number, (batch, expected) in enumerate(zip(held, reference)):
        assert torch.equal(batch.images, expected.images), f"batch {number} was overwritten"
    assert [b.shared_images for b in held[:4]] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    # the workers numbered 8 batches each (and a few prefetched), all released but the ones in flight
    assert stream.batch_memory.released.tolist() == [BATCHES // 2] * 2
    assert min(stream.batch_memory.sent.tolist()) > BATCHES // 2


def test_a_consumer_that_never_releases_gets_fresh_memory_and_correct_batches(demo_root, tokenizer, reference):
    """A plain DataLoader over a stream with batch memory: no release ever comes, so no buffer may be written twice."""
    stream = _stream(demo_root, tokenizer)
    stream.batch_memory = BatchMemory(2, depth=2)
    held = _held(DataLoader(stream, batch_size=None, num_workers=2))
    for number, (batch, expected) in enumerate(zip(held, reference)):
        assert torch.equal(batch.images, expected.images), f"batch {number} was overwritten"
    assert len({b.images.untyped_storage().data_ptr() for b in held}) == BATCHES


def test_the_ring_reuses_a_buffer_only_after_its_batch_is_released():
    memory = BatchMemory(1, depth=3)
    ring = ImageRing(memory, 0, (2, 3, 4, 4))
    taken = [ring.take() for _ in range(5)]
    assert [number for _, number in taken] == [0, 1, 2, 3, 4] and ring.fresh == 5  # nothing released: all fresh
    memory.release(0, 2)  # batches 0-2 done; 3 and 4 still out
    buffer, number = ring.take()  # slot 5 % 3 = 2 last held batch 2: released
    assert number == 5 and buffer.data_ptr() == taken[2][0].data_ptr() and ring.fresh == 5
    buffer, number = ring.take()  # slot 0 last held batch 3: not released
    assert buffer.data_ptr() not in {b.data_ptr() for b, _ in taken} and ring.fresh == 6
    assert buffer.is_contiguous(memory_format=torch.channels_last) and buffer.is_shared()

