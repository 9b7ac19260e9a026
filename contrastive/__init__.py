"""Contrastive image-text pretraining: CLIP, SigLIP, CapPa and CoCa with torchrun, Hydra and webdataset."""

import os

# torch's CPU allocator backs every allocation of 2 MB or more with transparent huge pages when this is set (it reads
# it once, at its first allocation, so only where this package is imported before torch). A fresh batch-sized buffer
# then costs a few hundred page faults instead of thousands: normalising a 64-image uint8 batch to float32 on the CPU
# took 4x less time (benchmarks/data_throughput.py). Set THP_MEM_ALLOC_ENABLE=0 to keep torch's default.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
