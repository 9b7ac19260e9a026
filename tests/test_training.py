"""Training end to end on tiny models: one process, two torchrun processes, kill and resume, bad config values."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from contrastive.checkpoint_io import list_checkpoints, load_checkpoint
from tests.conftest import run, running, stop, tiny_run_overrides, torchrun, torchrun_command

TRAIN = ["-m", "contrastive.cli.train"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in _metrics(run_dir) if "loss" in row]


def _train_one_process(overrides: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, *TRAIN, *overrides], timeout=timeout)


def test_one_process_debug_run_writes_metrics_and_checkpoints(demo_root, tmp_path):
    run_dir = tmp_path / "run"
    result = _train_one_process(tiny_run_overrides(demo_root, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in _metrics(run_dir)] == [1, 2, 3, 4]
    assert [step for step, _ in list_checkpoints(run_dir)] == [2, 4]
    state = load_checkpoint(list_checkpoints(run_dir)[-1][1])
    assert state["step"] == 4 and state["samples_seen"] == 4 * 16
    assert state["data_positions"][0], "the checkpoint records the data position"


@pytest.mark.distributed
def test_two_process_training_lowers_the_loss(demo_root, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(demo_root, run_dir) + [
        "trainer.max_steps=30", "trainer.log_every=5", "trainer.checkpoint_every=30",
        "data.batch_size=64", "optim.lr=3e-3", "optim.warmup_steps=5", "data.num_workers=1",
    ]
    torchrun([*TRAIN, *overrides], nproc=2)
    losses = _losses(run_dir)
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.distributed
@pytest.mark.parametrize(("model", "loss", "terms"), [
    ("tiny_cappa", "cappa", {"caption_loss"}),
    ("tiny_coca", "coca", {"contrastive_loss", "caption_loss"}),
])
def test_two_process_captioning_training_lowers_the_loss(demo_root, tmp_path, model, loss, terms):
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_run_overrides(demo_root, run_dir) if not o.startswith("model=")] + [
        f"model={model}", f"loss={loss}", "trainer.max_steps=20", "trainer.log_every=5",
        "trainer.checkpoint_every=20", "data.batch_size=32", "optim.lr=3e-3", "optim.warmup_steps=3",
    ]
    torchrun([*TRAIN, *overrides], nproc=2)
    rows = [row for row in _metrics(run_dir) if "loss" in row]
    assert all(terms <= set(row) for row in rows)
    losses = [row["loss"] for row in rows]
    assert len(losses) == 4 and losses[-1] < losses[0] - 1.0, losses


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(run_dir)[-1][1])["model"]


# CapPa with patch dropout: both of the model's random draws (kept patches, parallel-prediction rows) must resume.
RANDOM_CAPPA = ["model=tiny_cappa", "loss=cappa", "+model.vision.patch_dropout=0.5"]


@pytest.mark.distributed
@pytest.mark.parametrize(("num_workers", "model"), [(0, []), (2, []), (0, RANDOM_CAPPA)],
                         ids=["workers0", "workers2", "workers0-cappa-patch-dropout"])
def test_kill_and_resume_matches_uninterrupted_run(demo_root, tmp_path, num_workers, model):
    """SIGKILL a 2-process run after its step-3 checkpoint, resume=latest; weights equal an uninterrupted run."""
    common = ["trainer.max_steps=8", "trainer.checkpoint_every=3", "trainer.keep_last_checkpoints=10",
              f"data.num_workers={num_workers}", "trainer.deterministic=true", *model]

    def run_overrides(run_dir: Path) -> list[str]:
        return [o for o in tiny_run_overrides(demo_root, run_dir) if not (model and o.startswith("model="))]

    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    torchrun([*TRAIN, *run_overrides(straight_dir), *common], nproc=2)

    overrides = [*TRAIN, *run_overrides(resumed_dir), *common]
    with running(torchrun_command(overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
        deadline = time.time() + 600
        while not any(step == 3 for step, _ in list_checkpoints(resumed_dir)) and time.time() < deadline:
            assert process.poll() in (None, 0)
            time.sleep(0.02)
        stop(process, grace=0)  # SIGKILL the launcher and both workers (they run in sessions of their own)
    for step, path in list_checkpoints(resumed_dir):  # as if the crash came right after the step-3 checkpoint
        if step > 3:
            path.unlink()
    metrics_file = resumed_dir / "metrics.jsonl"
    metrics_file.write_text("".join(line + "\n" for line in metrics_file.read_text().splitlines()
                                    if json.loads(line)["step"] <= 3))

    torchrun([*overrides, "resume=latest"], nproc=2)
    assert [row["step"] for row in _metrics(resumed_dir)] == list(range(1, 9))
    straight, resumed = _final_weights(straight_dir), _final_weights(resumed_dir)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)
    straight_state = load_checkpoint(list_checkpoints(straight_dir)[-1][1])
    resumed_state = load_checkpoint(list_checkpoints(resumed_dir)[-1][1])
    assert resumed_state["data_positions"] == straight_state["data_positions"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "optim.lr must be positive"),
        ("loss.name=nonsense", "loss.name='nonsense' is not one of"),
        ("+model.vision.bogus_key=1", "model.vision has unknown key(s) bogus_key"),
        ("data.sources.0.shards='/nonexistent/{0..3}.tar'", "4 of 4 shards do not exist"),
    ],
)
def test_bad_config_value_gives_one_clear_line(demo_root, tmp_path, override, message):
    result = _train_one_process([*tiny_run_overrides(demo_root, tmp_path / "run"), override])
    assert result.returncode == 2
    assert "contrastive-train: error: " in result.stderr and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.distributed
def test_batch_size_must_divide_by_world_size(demo_root, tmp_path):
    result = torchrun([*TRAIN, *tiny_run_overrides(demo_root, tmp_path / "run"), "data.batch_size=15"], check=False)
    assert result.returncode != 0
    assert "contrastive-train: error: data.batch_size=15 is not divisible by the world size 2" in result.stderr


def test_existing_run_directory_is_not_overwritten(demo_root, tmp_path):
    run_dir = tmp_path / "run"
    assert _train_one_process(tiny_run_overrides(demo_root, run_dir)).returncode == 0
    again = _train_one_process(tiny_run_overrides(demo_root, run_dir))
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr
