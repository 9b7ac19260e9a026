"""Launchers: two torchrun "nodes" on loopback train exactly like one node, launch/torchrun.sh passes overrides
through, and launch/slurm.sbatch (under a stand-in for srun/scontrol/scancel) checkpoints, stops and requeues on
the time-limit warning, after which the requeued job finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from contrastive.checkpoint_io import list_checkpoints, load_checkpoint
from tests.conftest import REPO, free_port, running, tiny_run_overrides

TRAIN = ["-m", "contrastive.cli.train"]
COMMON = ["trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.deterministic=true", "data.num_workers=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
       "PYTHON": sys.executable}


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(run_dir)[-1][1])["model"]


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _start(command: list[str], env: dict[str, str]):
    """A running launcher (a context manager: it and every process it started end with the block)."""
    return running(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check(process: subprocess.Popen, timeout: float = 300) -> None:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"{stdout[-3000:]}\n{stderr[-5000:]}"


@pytest.mark.distributed
def test_two_nodes_with_c10d_rendezvous_match_one_node(demo_root, tmp_path):
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    with _start(["bash", "launch/torchrun.sh", *tiny_run_overrides(demo_root, one_node), *COMMON],
                {**ENV, "NPROC": "2"}) as process:
        _check(process)
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", "--rdzv_id=two-nodes",
                  f"--rdzv_endpoint=127.0.0.1:{free_port()}"]
    with ExitStack() as stack:
        nodes = [stack.enter_context(_start([sys.executable, "-m", "torch.distributed.run", *rendezvous,
                                             f"--node_rank={node}", *TRAIN, *tiny_run_overrides(demo_root, two_nodes),
                                             *COMMON], ENV))
                 for node in (0, 1)]
        for node in nodes:
            _check(node)

    assert _steps(two_nodes) == _steps(one_node) == list(range(1, 7))
    assert {p.name for p in two_nodes.glob("train_rank*.log")} == {"train_rank0.log", "train_rank1.log"}
    expected = _final_weights(one_node)
    actual = _final_weights(two_nodes)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for srun: start the command once per node on this machine, each task in its own process group.
while [[ "$1" == --* ]]; do shift; done
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node setsid "$@" &
  echo $! >> "$FAKE_SLURM/tasks"
done
status=0
for pid in $(jobs -p); do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
# Stand-in for `scancel --signal=SIG JOB`: signal every task of the job's steps.
signal=${1#--signal=}
for pid in $(cat "$FAKE_SLURM/tasks"); do kill -s "$signal" "$pid" 2>/dev/null; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# Stand-in for `scontrol show hostnames` (every node is this machine) and `scontrol requeue JOB`.
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "$2" >> "$FAKE_SLURM/requeued" ;;
esac
"""


def _fake_slurm(directory: Path) -> dict[str, str]:
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in {"srun": FAKE_SRUN, "scancel": FAKE_SCANCEL, "scontrol": FAKE_SCONTROL}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM": str(directory), "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_SUBMIT_DIR": str(REPO),
            "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port())}


@pytest.mark.distributed
@pytest.mark.slow
def test_slurm_time_limit_warning_checkpoints_requeues_and_the_requeued_job_finishes(demo_root, tmp_path):
    run_dir, fake = tmp_path / "run", tmp_path / "slurm"
    max_steps = 120
    overrides = [*tiny_run_overrides(demo_root, run_dir), f"trainer.max_steps={max_steps}",
                 "trainer.checkpoint_every=1000", "trainer.log_every=1", "data.num_workers=1"]
    env = _fake_slurm(fake)
    with _start(["bash", "launch/slurm.sbatch", *overrides], env) as job:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 600
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
            assert job.poll() is None, job.communicate()
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` does before the time limit
        _check(job)

    assert (fake / "requeued").read_text().split() == ["4242"]
    [(stopped_at, _)] = list_checkpoints(run_dir)
    assert 2 <= stopped_at < max_steps, "the preemption checkpoint comes before the end of the run"
    assert _steps(run_dir)[-1] == stopped_at

    (fake / "tasks").unlink()
    with _start(["bash", "launch/slurm.sbatch", *overrides], {**env, "MASTER_PORT": str(free_port())}) as job:
        _check(job)
    assert _steps(run_dir) == list(range(1, max_steps + 1))
    assert (fake / "requeued").read_text().split() == ["4242"], "a finished run is not requeued"
