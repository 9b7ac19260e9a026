"""How batches cross from a DataLoader worker to the main process. Reused shared memory for image batches
(contrastive.data.batch_memory): a worker writes a buffer again only after the main process released the batch last
sent in it, so every batch a consumer holds keeps its pixels; the reference is the same stream through a plain
DataLoader, whose workers take fresh shared memory for every batch. A buffer's handle crosses once, and a batch's
small tensors cross by value (contrastive.types.BY_VALUE_BYTES)."""

from __future__ import annotations

import dataclasses
import gc
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
from torch.utils.data import DataLoader

from contrastive.data import batch_memory
from contrastive.data.batch_memory import BatchMemory, ImageRing, StreamLoader
from contrastive.data.shards import expand_shards
from contrastive.data.stream import ImageTextStream, Source, StreamLayout
from contrastive.data.transforms import build_train_transform
from contrastive.models import build_tokenizer
from contrastive.types import BY_VALUE_BYTES, Batch, TeacherTargets
from tests.conftest import compose_config
from tests.test_pin_memory import _full_batch

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



def test_a_ring_buffer_crosses_as_shared_memory_once_then_as_its_place_in_the_ring():
    """The first batch in a buffer carries its shared-memory handle; later batches in it carry only the slot, which
    the receiving process maps to the buffer it already has. A fresh buffer (its slot's batch not released) is sent
    again. Pickling in one process stands in for the worker-to-main crossing."""
    memory = BatchMemory(1, depth=1)
    ring = ImageRing(memory, 0, (2, 3, 4, 4))
    buffer, number = ring.take()
    buffer.fill_(7)
    sent = ForkingPickler.dumps(ring.sendable(number))
    assert b"rebuild_storage_fd" in bytes(sent)
    received = pickle.loads(sent)
    assert torch.equal(received, buffer)
    memory.release(0, number)
    reused, number = ring.take()
    assert reused.data_ptr() == buffer.data_ptr()
    reused.fill_(9)  # the worker writes the next batch into the same memory
    sent = ForkingPickler.dumps(ring.sendable(number))
    assert b"rebuild_storage_fd" not in bytes(sent)
    assert pickle.loads(sent) is received and torch.equal(received, reused)
    fresh, number = ring.take()  # batch 1 not released: its slot gets new memory, which must cross again
    fresh.fill_(3)
    sent = ForkingPickler.dumps(ring.sendable(number))
    assert b"rebuild_storage_fd" in bytes(sent)
    assert torch.equal(pickle.loads(sent), fresh)
    token = memory.token
    del memory, ring
    gc.collect()
    assert not [key for key in batch_memory._RECEIVED if key[0] == token]  # the received buffers went with it


def test_a_batch_sends_its_small_tensors_by_value_and_large_ones_as_shared_memory():
    """Every field arrives equal; tensors up to BY_VALUE_BYTES arrive as plain memory (by value, no file descriptor
    to fetch from the worker), larger ones and bfloat16 (no numpy dtype) as shared memory."""
    batch = dataclasses.replace(_full_batch(), images=torch.randint(0, 256, (BY_VALUE_BYTES // 48 + 1, 3, 4, 4),
                                                                    dtype=torch.uint8))
    batch.teachers["t"].patch_tokens = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    received = pickle.loads(ForkingPickler.dumps(batch))
    assert type(received) is Batch
    for field in dataclasses.fields(Batch):
        before, after = getattr(batch, field.name), getattr(received, field.name)
        if isinstance(before, torch.Tensor):
            assert after.dtype == before.dtype and torch.equal(after, before), field.name
            assert after.is_shared() == (field.name == "images"), field.name
        elif field.name != "teachers":
            assert after == before, field.name
    for target_field in dataclasses.fields(TeacherTargets):
        before = getattr(batch.teachers["t"], target_field.name)
        after = getattr(received.teachers["t"], target_field.name)
        assert after.dtype == before.dtype and torch.equal(after, before), target_field.name
        assert after.is_shared() == (target_field.name == "patch_tokens"), target_field.name
