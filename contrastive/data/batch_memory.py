"""Shared memory for the training stream's image batches, written again once the main process is done with it.

A DataLoader worker hands a batch's tensors to the main process as handles to shared memory. Fresh shared memory for
every batch costs a file, a mapping, and a page fault for every 4 KiB the crops are written into: on the 256 px
benchmark about as much per sample as resizing the crop (benchmarks/data_throughput.py). Each worker here keeps a
ring of image buffers instead and writes into one again only once the main process has released the batch last sent
in it. `StreamLoader` releases each batch as it yields it, after the images are out of the shared buffer: the
DataLoader's pinned copy where it pins, else a copy of its own (one memcpy in the main process, no page faults where
the trainer's host-memory policy recycles freed blocks).

The ring holds the plain crop batches (one image per sample, the trainer's default path, with or without teachers'
targets or LocCa tasks); extra views, NaFlex patches, length-bucketed batches and data.decode_device=cuda (whose
unwritten rows must stay black) take fresh memory as before. A buffer that is not released is never written again:
the worker takes fresh memory instead. A consumer that keeps every batch, or one that iterates a plain DataLoader
over the stream and never releases, gets correct batches, only without the saving (tests/test_batch_memory.py).

A ring buffer's shared-memory handle crosses to the main process once: torch hands a tensor over as a file
descriptor that the main process fetches over a socket from a server thread in the worker, which waits for the
worker's GIL (up to its 5 ms switch interval while the worker decodes). A batch in a buffer the main process already
has carries the buffer's place in the ring instead (RingImages), and the main process looks it up.

Batches are numbered per DataLoader worker by a counter in shared memory that outlives the worker's iterators, so a
new iterator (persistent workers) never mistakes an old batch's release for one of its own. The main process yields
a worker's batches in the order that worker sent them, and drops the ones an abandoned iterator never yielded, so
releasing batch k releases every earlier batch of that worker too.
"""

from __future__ import annotations

import math
import uuid
import weakref
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader

from contrastive.types import Batch


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8,
                  channels_last: bool = False) -> torch.Tensor:
    """A tensor in fresh shared memory: sending it to the main process passes a handle instead of copying it (what
    torch's default_collate does). `channels_last`: (B, C, H, W) laid out as (B, H, W, C)."""
    memory = (shape[0], *shape[2:], shape[1]) if channels_last else shape
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    tensor = torch.empty(0, dtype=dtype).new(storage).view(memory)
    return tensor.permute(0, 3, 1, 2) if channels_last else tensor


# In the receiving process: (BatchMemory.token, DataLoader worker, ring slot) -> the buffer last received for it
_RECEIVED: dict[tuple[str, int, int], torch.Tensor] = {}


def _received_buffer(key: tuple[str, int, int], buffer: torch.Tensor | None) -> torch.Tensor:
    if buffer is not None:
        _RECEIVED[key] = buffer
    return _RECEIVED[key]


def _forget_received(token: str) -> None:
    for key in [key for key in _RECEIVED if key[0] == token]:
        del _RECEIVED[key]


@dataclass
class RingImages:
    """A ring buffer as a batch's `images` between the worker's yield and its pickling (the DataLoader worker sends
    it at once): pickled, it is the buffer's shared-memory handle the first time this buffer is sent, and only its
    place in the ring after that. Unpickled, it is the buffer."""

    buffer: torch.Tensor
    key: tuple[str, int, int]
    first_send: bool

    def __reduce__(self):
        return _received_buffer, (self.key, self.buffer if self.first_send else None)


class BatchMemory:
    """Made in the main process before the workers start; `sent` is written by the workers, `released` by the main
    process (StreamLoader), one counter each per DataLoader worker."""

    def __init__(self, num_workers: int, depth: int) -> None:
        self.depth = depth  # ring buffers per worker: more than the batches a worker can have in flight
        self.sent = torch.zeros(max(1, num_workers), dtype=torch.int64).share_memory_()
        self.released = torch.zeros(max(1, num_workers), dtype=torch.int64).share_memory_()  # batches below: done
        self.token = uuid.uuid4().hex  # names its buffers in the receiving process
        weakref.finalize(self, _forget_received, self.token)  # the received buffers go with the loader

    def release(self, worker: int, number: int) -> None:
        self.released[worker] = max(int(self.released[worker]), number + 1)


class ImageRing:
    """A DataLoader worker's image buffers, for one iterator of the stream."""

    def __init__(self, memory: BatchMemory, worker: int, shape: tuple[int, ...]) -> None:
        self.memory, self.worker, self.shape = memory, worker, shape
        self.buffers: dict[int, tuple[torch.Tensor, int]] = {}  # ring slot -> (buffer, number of the batch it held)
        self.fresh = 0  # buffers allocated, reused ones not counted
        self.unsent: set[int] = set()  # slots whose buffer the main process has not received yet

    def take(self) -> tuple[torch.Tensor, int]:
        """A channels-last uint8 buffer for the worker's next batch, and that batch's number."""
        number = int(self.memory.sent[self.worker])
        self.memory.sent[self.worker] = number + 1
        slot = number % self.memory.depth
        held = self.buffers.get(slot)
        if held is not None and held[1] < int(self.memory.released[self.worker]):
            buffer = held[0]
        else:
            buffer = shared_tensor(self.shape, channels_last=True)
            self.fresh += 1
            self.unsent.add(slot)
        self.buffers[slot] = (buffer, number)
        return buffer, number

    def sendable(self, number: int) -> RingImages:
        """Batch `number`'s images, as the batch sent to the main process carries them."""
        slot = number % self.memory.depth
        first_send = slot in self.unsent
        self.unsent.discard(slot)
        return RingImages(self.buffers[slot][0], (self.memory.token, self.worker, slot), first_send)


class StreamLoader(DataLoader):
    """A DataLoader over an ImageTextStream whose workers reuse image memory (BatchMemory): each batch it yields owns
    its images, and is released to its worker as it is yielded."""

    def __init__(self, stream, *, num_workers: int, pin_memory: bool = False, prefetch_factor: int = 4) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=num_workers > 0,
                         prefetch_factor=prefetch_factor if num_workers > 0 else None)
        if num_workers > 0:
            # a worker has at most prefetch_factor batches sent and not yet yielded; two more spare a fresh buffer
            # when the consumer is a batch behind
            stream.batch_memory = BatchMemory(num_workers, prefetch_factor + 2)

    def __iter__(self):
        for batch in super().__iter__():
            yield self._own(batch)

    def _own(self, batch: Batch) -> Batch:
        if batch.shared_images is None:
            return batch
        owned = batch if batch.images.is_pinned() else replace(batch, images=batch.images.clone())  # pinning copied it
        self.dataset.batch_memory.release(*batch.shared_images)
        return owned
