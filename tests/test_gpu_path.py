"""What a GPU run needs of the trainer, checked on CPU: every tensor reaches a collective on the process group's
device, collectives are called from contrastive/dist/ alone, and a step waits for the device only at log steps.

nccl rejects CPU tensors, and on a GPU a host sync stalls the pipeline; on CPU with gloo neither shows. So the
tests make both visible: tensors that the step's code (train/, dist/, losses/, models/) creates without naming a
device land on torch's `lazy` device (a CPU-backed device that is neither the compute nor the group's device, as
the CPU is on a GPU node), and every call of that code that reads a tensor's value on the host is counted.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import contrastive
from contrastive.dist import DistEnv, LocalCollectives, ProcessGroupCollectives
from contrastive.train.trainer import Trainer
from tests.conftest import compose_config, tiny_run_overrides

PACKAGE = Path(contrastive.__file__).resolve().parent
DIST_PACKAGE = PACKAGE / "dist"
# The step's code. Data runs in loader workers and evaluation scores on the host, both by design.
STEP_PACKAGES = [PACKAGE / name for name in ("train", "dist", "losses", "models")]
TORCH_PACKAGE = Path(torch.__file__).resolve().parent
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
              torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "all_to_all_single", "isend", "irecv",
               "send", "recv", "batch_isend_irecv", "broadcast_object_list", "all_gather_object", "barrier")


def _caller() -> tuple[Path | None, int]:
    """File and line of the innermost frame outside torch and this test: who asked for the current operation."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if not path.is_relative_to(TORCH_PACKAGE) and path != Path(__file__):
            return path, frame.f_lineno
        frame = frame.f_back
    return None, 0


def _calling_file() -> Path | None:
    return _caller()[0]


def _from_training_code(path: Path | None) -> bool:
    return path is not None and any(path.is_relative_to(package) for package in STEP_PACKAGES)


class UnplacedTensorsGoElsewhere(TorchFunctionMode):
    """Factories called by our training code without a device build on `lazy`, as a GPU run builds on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None and _from_training_code(_calling_file()):
            kwargs["device"] = "lazy"
        return func(*args, **kwargs)


class HostReadCounter(TorchFunctionMode):
    """Counts, per trainer step, the calls of our training code that bring a tensor's value to the host."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.trainer = trainer
        self.per_step: Counter[int] = Counter()
        self.callers: Counter[tuple[int, str]] = Counter()  # (step, file:line) for the failure message

    def __torch_function__(self, func, types, args=(), kwargs=None):
        path, line = _caller()
        if func in HOST_READS and _from_training_code(path):
            self.per_step[self.trainer.step] += 1
            self.callers[self.trainer.step, f"{path.relative_to(PACKAGE)}:{line}"] += 1
        return func(*args, **(kwargs or {}))


def _tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dist.P2POp):
        return [value.tensor]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors_in(item)]
    return []


@contextmanager
def recorded_collectives(calls: list[tuple[str, list[torch.device], Path | None]]):
    """Wrap every torch.distributed collective (and the aliases our modules hold) to record its tensors' devices
    and its caller."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    patched: list[tuple[object, str, object]] = []

    def recording(name, original):
        def collective(*args, **kwargs):
            devices = [t.device for t in _tensors_in([*args, *kwargs.values()])]
            calls.append((name, devices, _calling_file()))
            return original(*args, **kwargs)
        return collective

    wrappers = {name: recording(name, original) for name, original in originals.items()}
    modules = [dist] + [m for n, m in list(sys.modules.items()) if n.startswith("contrastive") and m is not None]
    for module in modules:
        for attribute, value in list(vars(module).items()):
            for name, original in originals.items():
                if value is original:
                    patched.append((module, attribute, value))
                    setattr(module, attribute, wrappers[name])
    try:
        yield
    finally:
        for module, attribute, value in patched:
            setattr(module, attribute, value)


@pytest.fixture
def one_rank_process_group():
    """A real gloo process group of one rank in this process, torn down afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def lazy_device():
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()


def _trainer(demo_root: Path, run_dir: Path, overrides: list[str], collectives) -> Trainer:
    cfg = OmegaConf.to_object(compose_config(tiny_run_overrides(demo_root, run_dir) + overrides))
    env = DistEnv(rank=0, world_size=1, device=torch.device("cpu"), collectives=collectives)
    return Trainer(cfg, env)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_every_collective_gets_tensors_on_the_group_device_and_is_called_from_dist(
        demo_root, tmp_path, one_rank_process_group, lazy_device, loss):
    overrides = [f"loss={loss}", "model.init_logit_bias=-10.0", "trainer.max_steps=4", "trainer.log_every=2",
                 "trainer.checkpoint_every=2", "eval.every_steps=2", "eval.batch_size=256", "data.epochs=2",
                 "data.resampled=false",
                 f"eval.zeroshot=[{{name: fashion-mnist, root: '{demo_root}', split: test}}]"]
    collectives = ProcessGroupCollectives("cpu")
    trainer = _trainer(demo_root, tmp_path / "run", overrides, collectives)
    calls: list[tuple[str, list[torch.device], Path | None]] = []
    with recorded_collectives(calls), UnplacedTensorsGoElsewhere():
        result = trainer.train()
    assert result.final_step == 4
    names = {name for name, _, _ in calls}
    # the step's loss, log steps' reductions, checkpoints' data positions, evaluation's result broadcast
    assert {"all_reduce", "all_gather_object", "broadcast_object_list"} <= names, names
    assert names & {"all_gather_single", "all_gather_into_tensor"} or loss == "siglip", names
    misplaced = [(name, devices) for name, devices, _ in calls if any(d != collectives.device for d in devices)]
    assert not misplaced, f"collectives given tensors off the group's device {collectives.device}: {misplaced}"
    outside = {(name, str(caller)) for name, _, caller in calls
               if caller is not None and caller.is_relative_to(PACKAGE) and not caller.is_relative_to(DIST_PACKAGE)}
    assert not outside, f"collectives called outside contrastive/dist/: {outside}"


def test_a_misplaced_tensor_is_refused_with_the_devices_named(one_rank_process_group, lazy_device):
    collectives = ProcessGroupCollectives("cpu")
    with pytest.raises(RuntimeError, match="all_reduce_sum got a tensor on lazy:0; .* take tensors on cpu"):
        collectives.all_reduce_sum(torch.ones(2, device="lazy"))


# Imports of torch.distributed outside contrastive/dist/ that communicate with no rank, each with its reason.
NON_COMMUNICATING_IMPORTS = {
    # DCP files read and written by one process (every call passes no_dist=True; checked below)
    ("contrastive/checkpoint_io.py", "torch.distributed.checkpoint"),
    ("contrastive/checkpoint_io.py", "torch.distributed.checkpoint.metadata"),
    ("contrastive/train/checkpoint.py", "torch.distributed.checkpoint"),
    # EMA weights: a type check for sharded parameters and the activation-checkpoint wrapper's name prefix
    ("contrastive/models/ema.py", "torch.distributed.tensor"),
    ("contrastive/models/ema.py", "torch.distributed.algorithms._checkpoint.checkpoint_wrapper"),
}


def test_only_contrastive_dist_imports_torch_distributed():
    importers, process_group_calls = [], []
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(DIST_PACKAGE):
            continue
        name = str(path.relative_to(PACKAGE.parent))
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                modules = [f"torch.{alias.name}" for alias in node.names]
            importers += [f"{name}: {m}" for m in modules
                          if (m == "torch.distributed" or m.startswith("torch.distributed."))
                          and (name, m) not in NON_COMMUNICATING_IMPORTS]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "dcp" \
                    and node.func.attr in ("save", "load", "async_save"):
                one_process = any(k.arg == "no_dist" and isinstance(k.value, ast.Constant) and k.value.value is True
                                  for k in node.keywords)
                if not one_process:
                    process_group_calls.append(f"{name}:{node.lineno}: dcp.{node.func.attr}")
    assert not importers, importers
    assert not process_group_calls, f"DCP calls with process groups outside contrastive/dist/: {process_group_calls}"


def test_steps_between_log_steps_never_wait_for_the_device(demo_root, tmp_path):
    trainer = _trainer(demo_root, tmp_path / "run", ["trainer.max_steps=9", "trainer.log_every=3",
                                                     "trainer.checkpoint_every=100"], LocalCollectives())
    assert trainer.optimizer.defaults["fused"], "the default optimiser takes its step without a host sync"
    counter = HostReadCounter(trainer)
    with counter:
        trainer.train()
    # Reads are counted under the step number they happen at: a log step's after its counter advanced (3, 6, 9).
    # Before the first step (0) the data loader draws its base seed; the last step (9) also checks the weights are
    # finite before checkpointing them and reads the skipped-step count for the result.
    assert set(counter.per_step) <= {0, 3, 6, 9}, sorted(counter.callers.items())
    assert counter.per_step[3] == counter.per_step[6] == 1, sorted(counter.callers.items())
