"""Pinned batches, checked on CPU: pinning needs CUDA, so torch's Tensor.pin_memory is replaced by a stand-in that
returns a marked copy. What is tested is what the trainer relies on: DataLoader(pin_memory=True) calls
Batch.pin_memory, which must pin every tensor (a field left pageable makes the non-blocking copy to the device wait)
and keep every other field; and the trainer asks for pinning only on a CUDA device."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

import contrastive.train.trainer as trainer_module
from contrastive.dist import DistEnv, LocalCollectives
from contrastive.types import Batch, StreamPosition, TeacherTargets
from tests.conftest import compose_config, tiny_run_overrides


@pytest.fixture
def marked_pinning(monkeypatch):
    """Tensor.pin_memory -> a copy whose identity is recorded (pinned), so a test can tell pinned from not."""
    pinned: list[torch.Tensor] = []

    def pin(tensor: torch.Tensor) -> torch.Tensor:
        copy = tensor.clone()
        pinned.append(copy)
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    return pinned


def _teacher_targets() -> TeacherTargets:
    """Every field of TeacherTargets filled (checked below against the dataclass's fields)."""
    return TeacherTargets(image_features=torch.randn(2, 4), text_features=torch.randn(2, 4),
                          logit_scale=torch.tensor(10.0), logit_bias=torch.tensor(-5.0),
                          patch_tokens=torch.randn(2, 3, 4))


def _full_batch() -> Batch:
    """A batch with every field set to a value of its own (no defaults), so each can be checked after pinning."""
    position = StreamPosition(worker=0, sources={"a": (0, 2, 2)}, exhausted=(), past_plan=False, past_plan_samples=0,
                              mixer_draws=2, skipped={}, samples_seen=2)
    values = dict(
        images=torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8), tokens=torch.tensor([[1, 2, 0], [3, 0, 0]]),
        keys=["k0", "k1"], labels=torch.tensor([3, 7]), global_views=torch.randint(0, 256, (2, 2, 3, 4, 4)),
        local_views=torch.randint(0, 256, (2, 3, 3, 2, 2)), decoder_tokens=torch.tensor([[5, 6], [7, 8]]),
        decoder_prompt_lengths=torch.tensor([1, 2]), decoder_tasks=torch.tensor([0, 2]), stream_position=position,
        teacher_images=torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8), captions=["a", "b"],
        teachers={"t": _teacher_targets()}, patch_coord=torch.zeros(2, 5, 2, dtype=torch.long),
        patch_valid=torch.ones(2, 5, dtype=torch.bool), jpeg_bytes=[b"\xff\xd8", None],
        jpeg_crops=[(0, 1, 2, 3, True), (0, 0, 0, 0, False)], shared_images=(1, 5),
    )
    missing = {f.name for f in dataclasses.fields(Batch)} - set(values)
    assert not missing, f"Batch fields this test does not fill, so cannot check: {sorted(missing)}"
    return Batch(**values)


def _is_pinned(tensor: torch.Tensor, pinned: list[torch.Tensor]) -> bool:
    return any(tensor is copy for copy in pinned)


def test_batch_pin_memory_pins_every_tensor_and_keeps_every_field(marked_pinning):
    assert {f.name for f in dataclasses.fields(TeacherTargets)} == set(dataclasses.asdict(_teacher_targets()))
    batch = _full_batch()
    result = batch.pin_memory()
    assert type(result) is Batch
    for field in dataclasses.fields(Batch):
        before, after = getattr(batch, field.name), getattr(result, field.name)
        if isinstance(before, torch.Tensor):
            assert _is_pinned(after, marked_pinning), f"Batch.{field.name} was not pinned"
            assert after.dtype == before.dtype and torch.equal(after, before), field.name
        elif field.name == "teachers":
            assert set(after) == set(before)
            for name, targets in before.items():
                for target_field in dataclasses.fields(TeacherTargets):
                    value = getattr(after[name], target_field.name)
                    assert _is_pinned(value, marked_pinning), f"teachers[{name}].{target_field.name} was not pinned"
                    assert torch.equal(value, getattr(targets, target_field.name))
        else:
            assert after == before, field.name


def test_pinning_leaves_absent_fields_absent(marked_pinning):
    result = Batch(images=torch.zeros(1, 3, 2, 2, dtype=torch.uint8), tokens=torch.zeros(1, 2)).pin_memory()
    assert len(marked_pinning) == 2 and result.labels is None and result.teachers == {} and result.keys == []


@pytest.mark.parametrize(("device", "pin"), [("cpu", False), ("cuda", True)])
def test_the_trainer_asks_for_pinned_batches_only_on_cuda(demo_root, tmp_path, monkeypatch, device, pin):
    """The loader is rebuilt with the trainer's device replaced: on CPU pinning would fail (no CUDA) and gains
    nothing; on CUDA it is what makes the batch's copy to the device non-blocking."""
    cfg = OmegaConf.to_object(compose_config(tiny_run_overrides(demo_root, tmp_path / "run")))
    trainer = trainer_module.Trainer(cfg, DistEnv(rank=0, world_size=1, device=torch.device("cpu"),
                                                  collectives=LocalCollectives()))
    asked = {}
    monkeypatch.setattr(trainer_module, "build_train_loader", lambda *args, **kwargs: asked.update(kwargs))
    trainer.env = dataclasses.replace(trainer.env, device=torch.device(device))
    trainer._build_loader()
    assert asked["pin_memory"] is pin
