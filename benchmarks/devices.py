"""What the benchmark scripts share to measure on CPU or CUDA: the device, bf16 autocast, synchronised clocks,
peak memory, and a description of the machine for their JSON.

CUDA kernels run asynchronously, so every timed region starts and ends with `synchronize`; without it a step's
time is the time to queue its kernels.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed

DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
# Dense bf16 tensor-core peak of one H100 or H200 SXM (NVIDIA's datasheets quote twice this, with 2:4 sparsity).
H100_BF16_PEAK_FLOPS = 989e12


def benchmark_device(name: str) -> torch.device:
    """The device this process measures on; under torchrun each rank takes the GPU of its LOCAL_RANK."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; use --device cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def autocast(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    """The trainer's `trainer.precision`: bf16 is torch.autocast to bfloat16 on the model's device, fp32 nothing."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of `run`, including the device work it queued."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def memory_measure(device: torch.device) -> str:
    """What `peak_memory_bytes` reports on this device, for the JSON."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated (tensors only, since the process started)"
    return "process peak resident set size (ru_maxrss: interpreter and libraries included)"


def peak_memory_bytes(device: torch.device) -> int:
    """Highest memory this process has held on `device` so far (see `memory_measure`)."""
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def default_peak_flops(device: torch.device, precision: str) -> float | None:
    """The per-device peak MFU divides by when none is given: H100/H200 dense bf16 on CUDA, else unknown."""
    return H100_BF16_PEAK_FLOPS if device.type == "cuda" and precision == "bf16" else None


def describe_environment() -> dict:
    """Versions and accelerators (device properties only: nothing is allocated on the GPUs)."""
    cuda_visible = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())] if cuda_visible else []
    nccl = None
    if cuda_visible and torch.distributed.is_nccl_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "nccl": nccl,
        "cuda_visible": cuda_visible,
        "gpus": gpus,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
