"""Sharded (DCP) checkpoints and EMA weights: exact resume under FSDP2, loading on another world size and in
export, atomic commits, rotation, conversion between the formats."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from contrastive import checkpoint_io
from contrastive.checkpoint_io import SHARDED_PARTS, list_checkpoints, load_checkpoint
from contrastive.cli import export as export_cli
from contrastive.dist import init_distributed
from contrastive.encoders import load_encoder
from contrastive.models.ema import ExponentialMovingAverage
from contrastive.train import checkpoint as ckpt
from contrastive.train.trainer import Trainer
from tests.conftest import compose_config, running, stop, tiny_run_overrides, torchrun, torchrun_command

TRAIN = ["-m", "contrastive.cli.train"]
COMMON = ["dist.strategy=fsdp", "trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.keep_last_checkpoints=10",
          "trainer.deterministic=true", "trainer.ema.decay=0.9", "optim.lr=3e-3"]


def _assert_equal(actual, expected, where: str = "") -> None:
    """Nested dicts and lists of tensors (and plain values), bit for bit."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            _assert_equal(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (value, reference) in enumerate(zip(actual, expected)):
            _assert_equal(value, reference, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=where)
    else:
        assert actual == expected, where


def _steps(run_dir: Path) -> dict[int, Path]:
    return dict(list_checkpoints(run_dir))


@pytest.mark.distributed
def test_fsdp_dcp_kill_and_resume_is_exact_and_its_checkpoints_load_on_one_rank_and_in_export(demo_root, tmp_path):
    """The reference is an uninterrupted 2-rank FSDP run writing single files (rank 0 gathers everything). A DCP run
    SIGKILLed after its step-3 commit and resumed reaches the same model, optimiser and EMA state bit for bit; its
    step-3 checkpoint, written by 2 ranks, loads into one process and its last one into contrastive-export."""
    reference_dir, sharded_dir = tmp_path / "single", tmp_path / "sharded"
    torchrun([*TRAIN, *tiny_run_overrides(demo_root, reference_dir), *COMMON, "trainer.checkpoint_format=single"])
    reference = {step: load_checkpoint(path) for step, path in _steps(reference_dir).items()}
    assert sorted(reference) == [3, 6] and not reference[6]["ema"].keys() - reference[6]["model"].keys()
    assert any(not torch.equal(reference[6]["ema"][k], reference[6]["model"][k]) for k in reference[6]["ema"])

    overrides = [*TRAIN, *tiny_run_overrides(demo_root, sharded_dir), *COMMON]  # auto: dcp under fsdp
    with running(torchrun_command(overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
        deadline = time.time() + 600
        while 3 not in _steps(sharded_dir) and time.time() < deadline:
            assert process.poll() in (None, 0)
            time.sleep(0.02)
        stop(process, grace=0)
    for step, path in _steps(sharded_dir).items():  # as if the kill came right after the step-3 commit
        if step > 3:
            shutil.rmtree(path)
    metrics_file = sharded_dir / "metrics.jsonl"
    metrics_file.write_text("".join(line + "\n" for line in metrics_file.read_text().splitlines()
                                    if json.loads(line)["step"] <= 3))
    torchrun([*overrides, "resume=latest"])

    sharded = _steps(sharded_dir)
    assert sorted(sharded) == [3, 6] and all(path.is_dir() for path in sharded.values())
    assert sorted(p.name for p in sharded[6].glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # a file per rank
    for step in (3, 6):
        state = load_checkpoint(sharded[step], sharded_parts=SHARDED_PARTS)
        for part in ("model", "ema", "optimizer", "data_positions", "step", "scheduler"):
            _assert_equal(state[part], reference[step][part], part)
        # torch's global CPU generator reads back with two other bookkeeping fields after any resume, single files
        # too (left and next of its Mersenne twister state); the generators training draws from are compared whole
        _assert_equal([{k: v for k, v in rank.items() if k != "torch"} for rank in state["rng"]],
                      [{k: v for k, v in rank.items() if k != "torch"} for rank in reference[step]["rng"]], "rng")
        _assert_equal(state["optimizer"], reference[step]["optimizer"], "optimizer")

    # One process (DDP's layout: whole tensors) resumes the 2-rank step-3 checkpoint.
    cfg = compose_config([*tiny_run_overrides(demo_root, tmp_path / "one"), *COMMON[1:], f"resume={sharded[3]}"])
    trainer = Trainer(cfg)
    assert trainer.step == 3
    _assert_equal(trainer.model.state_dict(), reference[3]["model"], "model")
    _assert_equal(trainer.ema.shadow, reference[3]["ema"], "ema")
    saved_moments = reference[3]["optimizer"]["state"]
    for name, parameter in trainer.model.named_parameters():
        _assert_equal(trainer.optimizer.state[parameter]["exp_avg"], saved_moments[name]["exp_avg"], name)

    out = tmp_path / "bundle"
    assert export_cli.main(["--checkpoint", str(sharded_dir), "--format", "bundle", "--out", str(out),
                            "--weights", "ema"]) == 0
    exported = load_file(str(out / "vision.safetensors"))
    averaged = {**reference[6]["model"], **reference[6]["ema"]}
    first = next(iter(exported))
    prefix = next(key[:-len(first)] for key in averaged if key.endswith("visual." + first))
    _assert_equal(exported, {name: averaged[prefix + name] for name in exported}, "exported")
    assert load_encoder(sharded[6]).run_config["step"] == 6

    converted = ckpt.convert(sharded[6], tmp_path / "converted.pt")
    round_trip = ckpt.convert(reference_dir / "checkpoints" / "step_00000006.pt", tmp_path / "converted_dir")
    for path in (converted, round_trip):
        state = load_checkpoint(path, sharded_parts=SHARDED_PARTS)
        for part in ("model", "ema", "optimizer", "data_positions", "step"):
            _assert_equal(state[part], reference[6][part], part)


KILLED_WRITER = """
import sys, torch
from pathlib import Path
from contrastive.dist import init_distributed
from contrastive.train.checkpoint import Checkpointer
checkpointer = Checkpointer(Path(sys.argv[1]), "dcp", init_distributed("cpu"), keep_last=2, keep_every=None)
for step, size in ((1, 10), (2, 25_000_000)):  # the second, with AdamW state: 300 MB, long enough to catch
    model = torch.nn.Linear(1, 1)
    model.weight = torch.nn.Parameter(torch.zeros(size, 1))
    checkpointer.save(step, {"step": step, "config": {}}, model, torch.optim.AdamW(model.parameters()), None)
    checkpointer.wait()
"""


def test_a_kill_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    partial = checkpoint_io.checkpoint_path(tmp_path, 2, sharded=True) / "__0_0.distcp"
    with running([sys.executable, "-c", KILLED_WRITER, str(tmp_path)]) as writer:
        deadline = time.time() + 300
        while not (partial.is_file() and partial.stat().st_size > 30_000_000):
            assert writer.poll() is None and time.time() < deadline, "the second save was not caught writing"
            time.sleep(0.005)
        stop(writer, grace=0)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]
    path, state = ckpt.load_resume_state("latest", tmp_path)
    assert state["step"] == 1
    assert load_checkpoint(path)["model"]["weight"].shape == (10, 1)
    assert ckpt.remove_partial_writes(tmp_path) == [partial.parent]
    assert not partial.parent.exists()


def test_rotation_counts_only_committed_sharded_checkpoints(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpointer = ckpt.Checkpointer(tmp_path, "dcp", init_distributed("cpu"), keep_last=2, keep_every=4)
    unfinished = checkpoint_io.checkpoint_path(tmp_path, 9, sharded=True)
    unfinished.mkdir(parents=True)  # a write killed before its commit
    for step in range(1, 9):
        checkpointer.save(step, {"step": step, "config": {}}, model, optimizer, None)
    checkpointer.close()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 7, 8]
    assert unfinished.is_dir(), "not a checkpoint, so not rotated; remove_partial_writes clears it at start"


def test_ema_follows_the_hand_computed_average_with_warmup():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    model[1].weight.requires_grad_(False)  # frozen weights are not averaged
    ema = ExponentialMovingAverage(model, decay=0.5)
    expected = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert ema.shadow.keys() == expected.keys() == {"0.weight", "0.bias", "1.bias"}
    for update in range(1, 6):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        ema.update(update)
        decay = min(0.5, (1 + update) / (10 + update))  # 2/11, 3/12, 4/13, 5/14, then 0.5
        for name, parameter in model.named_parameters():
            if name in expected:
                expected[name] = decay * expected[name] + (1 - decay) * parameter.detach()
    for name in expected:
        torch.testing.assert_close(ema.shadow[name], expected[name], rtol=1e-6, atol=1e-6)


@pytest.mark.distributed
def test_checkpoint_benchmark_smoke(tmp_path):
    out = tmp_path / "checkpoint.json"
    torchrun(["benchmarks/checkpoint.py", "--model", "conf/model/test_tiny.yaml", "--repeats", "1",
              "--dir", str(tmp_path), "--json", str(out)], timeout=600)
    figures = json.loads(out.read_text())
    assert [row["format"] for row in figures["rows"]] == ["single", "dcp"] and figures["world_size"] == 2
    assert all(row["stall_s"] > 0 and row["load_s"] > 0 for row in figures["rows"])
    assert set(figures["ratios"]) == {"stall", "extra_rank0_host_memory", "load"}
    assert not [path for path in tmp_path.iterdir() if path.is_dir() and any(path.iterdir())], "checkpoints removed"
