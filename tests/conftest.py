"""Shared fixtures: a small real demo dataset, config composition, and torchrun launches on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from contrastive.config import register_configs
from contrastive.data.demo import build_demo_dataset

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
os.environ.setdefault("WANDB_MODE", "disabled")

register_configs()


def compose_config(overrides: list[str] | None = None, config_name: str = "train"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides or [])


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """512 train and 512 test samples of the demo data, in shards of 64 (train) and 32 (test)."""
    root = tmp_path_factory.mktemp("demo") / "fashion-mnist"
    build_demo_dataset(root, samples_per_shard=64, limit=512)
    return root


def tiny_run_overrides(demo_root: Path, run_dir: Path) -> list[str]:
    return [
        "model=test_tiny",
        "debug=tiny",
        f"data.sources.0.shards={demo_root / 'train'}",
        f"run_dir={run_dir}",
        "trainer.threads_per_process=1",
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 900, extra: list[str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node=N ARGS` on loopback with gloo; on failure show its output."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *(extra or []), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result
