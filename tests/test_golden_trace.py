"""A refactor guard: a fixed-seed 2-rank run of the tiny model gives the recorded loss trace and final weights.

The run: torchrun with 2 CPU ranks (gloo), `model=test_tiny debug=tiny`, 20 steps, deterministic algorithms, one
thread per rank, the loss logged at every step. What it must reproduce, in tests/golden/trace_tiny_2rank.json: the
loss of every step (exactly: the run is bit-stable on one machine and torch build) and a SHA-256 over the final
checkpoint's model state. A change that is meant to change training output (maths, initialisation, data order)
regenerates the file on purpose, and its commit says why:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_trace.py

The checkpoint and metrics files are read directly (torch.load, json), not through the package, so moving code
inside the package never touches this test.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_run_overrides, torchrun

GOLDEN = Path(__file__).resolve().parent / "golden" / "trace_tiny_2rank.json"
STEPS = 20


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor in sorted key order: its name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _trace(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    model_state = torch.load(final, map_location="cpu", weights_only=True)["model"]
    return {
        "torch": torch.__version__,
        "steps": [row["step"] for row in rows],
        "losses": [row["loss"] for row in rows],
        "final_checkpoint": final.name,
        "model_state_sha256": state_hash(model_state),
    }


@pytest.mark.distributed
def test_two_rank_tiny_run_reproduces_the_golden_trace(demo_root, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*tiny_run_overrides(demo_root, run_dir), f"trainer.max_steps={STEPS}", "trainer.log_every=1",
                 "trainer.deterministic=true"]
    torchrun(["-m", "contrastive.cli.train", *overrides], nproc=2)
    trace = _trace(run_dir)
    assert trace["steps"] == list(range(1, STEPS + 1))
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(trace, indent=1) + "\n")
        print(f"wrote {GOLDEN}", file=sys.stderr)
        return
    golden = json.loads(GOLDEN.read_text())
    where = f"(golden recorded with torch {golden['torch']}, this run has {trace['torch']})"
    assert trace["losses"] == golden["losses"], f"loss trace changed {where}"
    assert trace["final_checkpoint"] == golden["final_checkpoint"]
    assert trace["model_state_sha256"] == golden["model_state_sha256"], f"final weights changed {where}"
