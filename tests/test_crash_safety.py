"""Crash safety: atomic checkpoint writes, safe loading, NaN guards, preemption, elastic restarts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from contrastive import checkpoint_io
from contrastive.errors import TrainingDiverged
from contrastive.train import checkpoint as ckpt
from contrastive.train.trainer import Trainer
from contrastive.types import LossOutput
from tests.conftest import compose_config, running, stop, tiny_run_overrides, torchrun, torchrun_command

TRAIN = ["-m", "contrastive.cli.train"]
WRITER = """
import sys, torch
from pathlib import Path
from contrastive.train.checkpoint import save_checkpoint
state = {"model": {"w": torch.ones(150_000_000)}, "config": {}, "step": 4}
save_checkpoint(state, Path(sys.argv[1]), keep_last=5)
"""


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "config": {"name": "t"}, "step": step}


def test_checkpoint_write_killed_halfway_leaves_the_previous_one(tmp_path):
    ckpt.save_checkpoint(_state(2), checkpoint_io.checkpoint_path(tmp_path, 2), keep_last=5)
    with running([sys.executable, "-c", WRITER, str(checkpoint_io.checkpoint_path(tmp_path, 4))]) as writer:
        deadline = time.time() + 120
        while time.time() < deadline:
            partial = list(checkpoint_io.checkpoint_dir(tmp_path).glob(".step_*.tmp"))
            if partial and partial[0].stat().st_size > 50_000_000:
                break
            time.sleep(0.01)
        stop(writer, grace=0)
    assert [step for step, _ in checkpoint_io.list_checkpoints(tmp_path)] == [2]
    assert ckpt.load_resume_state("latest", tmp_path)[1]["step"] == 2
    assert ckpt.remove_partial_writes(tmp_path), "the half-written file is found and removed"
    assert not list(checkpoint_io.checkpoint_dir(tmp_path).glob(".step_*"))


def test_keep_last_and_every_mth(tmp_path):
    for step in range(1, 11):
        ckpt.save_checkpoint(_state(step), checkpoint_io.checkpoint_path(tmp_path, step), keep_last=2, keep_every=4)
    assert [step for step, _ in checkpoint_io.list_checkpoints(tmp_path)] == [4, 8, 9, 10]


def test_resume_latest_skips_a_damaged_newest_checkpoint(tmp_path, caplog):
    for step in (2, 4):
        ckpt.save_checkpoint(_state(step), checkpoint_io.checkpoint_path(tmp_path, step), keep_last=5)
    newest = checkpoint_io.checkpoint_path(tmp_path, 4)
    newest.write_bytes(newest.read_bytes()[:100])
    path, state = ckpt.load_resume_state("latest", tmp_path)
    assert state["step"] == 2 and path == checkpoint_io.checkpoint_path(tmp_path, 2)
    assert "skipping unreadable checkpoint" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"not a checkpoint at all", "cannot be read"),
        (b"PICKLE", "cannot be read"),
    ],
)
def test_loading_bad_files_gives_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content == b"PICKLE":  # a pickle that would run code if loaded without weights_only
        import pickle

        class Exploit:
            def __reduce__(self):
                return (os.system, ("touch " + str(tmp_path / "pwned"),))

        path.write_bytes(pickle.dumps({"model": Exploit(), "config": {}}))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        checkpoint_io.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_of_another_architecture_is_named(demo_root, tmp_path):
    cfg = compose_config(tiny_run_overrides(demo_root, tmp_path / "run"))
    trainer = Trainer(cfg)
    trainer.step = 1
    trainer.save()
    from contrastive.models import build_model

    bigger = compose_config(["model=tiny_clip"]).model
    with pytest.raises(ValueError, match="does not match this model architecture"):
        checkpoint_io.load_model_weights(build_model(bigger), checkpoint_io.list_checkpoints(tmp_path / "run")[-1][1])


def _nan_at(trainer: Trainer, steps: set[int]):
    objective = trainer.forward_backward.objective

    def poisoned(output, batch, collectives) -> LossOutput:
        result = objective(output, batch, collectives)
        if trainer.step in steps:
            result.loss = result.loss * float("nan")
        return result

    trainer.forward_backward.objective = poisoned


def _preemption_handlers() -> list:
    return [signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)]


def test_injected_nan_step_is_skipped_and_counted(demo_root, tmp_path):
    cfg = compose_config(tiny_run_overrides(demo_root, tmp_path / "run") + ["trainer.max_steps=5"])
    trainer = Trainer(cfg)
    _nan_at(trainer, {2})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    handlers = _preemption_handlers()
    result = trainer.train()
    assert _preemption_handlers() == handlers, "the trainer gives the signals back to their previous handlers"
    assert result.final_step == 5 and result.nonfinite_steps_skipped == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["nonfinite_steps_skipped"] for row in rows] == [0, 0, 1, 1, 1]
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_run_of_nans_stops_with_a_clear_error(demo_root, tmp_path):
    cfg = compose_config(tiny_run_overrides(demo_root, tmp_path / "run")
                         + ["trainer.max_steps=10", "trainer.max_nonfinite_steps=3"])
    trainer = Trainer(cfg)
    _nan_at(trainer, {4, 5, 6, 7, 8, 9})
    handlers = _preemption_handlers()
    with pytest.raises(TrainingDiverged) as error:
        trainer.train()
    assert _preemption_handlers() == handlers, "given back on the way out of an error too"
    message = str(error.value)
    assert "3 non-finite steps in a row ending at step 6" in message
    # skipped steps leave the weights untouched, so the step-6 checkpoint (after steps 4 and 5) is still good
    assert "contrastive_loss" in message and "step_00000006.pt" in message


def test_a_run_of_nans_between_log_steps_is_caught_at_the_next_one(demo_root, tmp_path):
    """Non-finite counts are read only at log steps (no host sync in between): a run that ended before the log step
    is still caught there, and the message says it ended earlier."""
    cfg = compose_config(tiny_run_overrides(demo_root, tmp_path / "run")
                         + ["trainer.max_steps=8", "trainer.log_every=4", "trainer.max_nonfinite_steps=3"])
    trainer = Trainer(cfg)
    _nan_at(trainer, {0, 1, 2})
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row before step 3 "):
        trainer.train()
    assert trainer.step == 4


def _workers_of(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the torchrun agent's worker processes."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = [item[len(b"RANK="):] for item in environ if item.startswith(b"RANK=")]
            if int(fields[1]) == agent_pid and rank:
                workers[int(rank[0])] = int(entry.name)
    return workers


def _launch(overrides: list[str], extra: list[str] = ()):
    """A running 2-process training (a context manager); its output is piped."""
    return running(torchrun_command([*TRAIN, *overrides], extra=list(extra)),
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(ready, process: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 600
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"no {what} in time"
        time.sleep(0.02)


def _wait_for_checkpoint(run_dir: Path, step: int, process: subprocess.Popen) -> None:
    _wait_for(lambda: any(s >= step for s, _ in checkpoint_io.list_checkpoints(run_dir)), process,
              f"step-{step} checkpoint")


def _logged_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.is_file() else []


@pytest.mark.distributed
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(demo_root, tmp_path):
    """Schedulers signal the tasks, not the launcher, and not always all of them at once: here only rank 1."""
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(demo_root, run_dir) + [
        "trainer.max_steps=100000", "trainer.log_every=2", "trainer.checkpoint_every=100000"]
    with _launch(overrides) as process:
        _wait_for(lambda: _logged_steps(run_dir), process, "logged step")  # the loop runs: the handler is set
        signalled_after = _logged_steps(run_dir)[-1]
        os.kill(_workers_of(process.pid)[1], signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)  # ranks that disagree hang in a collective
    assert process.returncode == 0, stderr[-3000:]

    logs = {rank: (run_dir / f"train_rank{rank}.log").read_text() for rank in (0, 1)}
    assert "rank 1 received SIGTERM" in logs[1] and "received SIGTERM" not in logs[0], "only rank 1 was signalled"
    stopped_at = {rank: re.findall(r"stopped for preemption at step (\d+)", log) for rank, log in logs.items()}
    assert stopped_at[0] == stopped_at[1] and len(stopped_at[0]) == 1, stopped_at
    step = int(stopped_at[0][0])
    assert signalled_after <= step < 100000
    # checkpoint_every is never reached: this is the preemption's
    [(saved, path)] = checkpoint_io.list_checkpoints(run_dir)
    assert saved == step and checkpoint_io.load_checkpoint(path)["step"] == step
    assert _logged_steps(run_dir)[-1] <= step


@pytest.mark.distributed
def test_a_restarted_worker_group_connects_even_when_rank_0_joins_last(tmp_path):
    out = tmp_path / "restarted.txt"
    torchrun(["tests/dist_scripts/restart_rendezvous.py", str(out)], extra=["--max-restarts=1"], timeout=300)
    assert sorted(out.read_text().splitlines()) == ["0 2.0", "1 2.0"]


@pytest.mark.distributed
@pytest.mark.slow
def test_worker_killed_by_sigkill_is_restarted_by_torchrun_and_matches_an_uninterrupted_run(demo_root, tmp_path):
    common = ["trainer.max_steps=10", "trainer.checkpoint_every=3", "trainer.deterministic=true",
              "data.num_workers=1"]
    torchrun([*TRAIN, *tiny_run_overrides(demo_root, tmp_path / "straight"), *common])
    run_dir = tmp_path / "restarted"
    with _launch(tiny_run_overrides(demo_root, run_dir) + common, extra=["--max-restarts=1"]) as process:
        _wait_for_checkpoint(run_dir, 3, process)
        os.kill(_workers_of(process.pid)[1], signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=900)  # generous: CI machines are shared
    assert process.returncode == 0, stderr[-3000:]
    assert "resuming from" in stdout + stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    repeated = len(steps) - len(set(steps))
    assert steps[-1] == 10 and repeated <= 2, f"repeated more than the steps since the checkpoint: {steps}"
    straight = checkpoint_io.load_checkpoint(checkpoint_io.list_checkpoints(tmp_path / "straight")[-1][1])["model"]
    restarted = checkpoint_io.load_checkpoint(checkpoint_io.list_checkpoints(run_dir)[-1][1])["model"]
    for name, tensor in straight.items():
        torch.testing.assert_close(restarted[name], tensor, rtol=0, atol=0, msg=name)
