"""trainer.precision=bf16 (the default on GPU), on CPU: the demo model trains within 2% of fp32's loss at every
logged step of 50, its towers compute in bf16, while the objective, the weights and the optimiser state stay fp32.
One process (bf16 autocast) and FSDP2 over two torchrun ranks (bf16 parameters and compute, fp32 reduction)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, torchrun
from tests.dist_scripts.precision_runs import run

STEPS = 50
RELATIVE_TOLERANCE = 0.02
OVERRIDES = ["data.batch_size=32", "trainer.threads_per_process=2"]


def _check(results: dict) -> None:
    fp32, bf16 = results["fp32"], results["bf16"]
    assert len(fp32["losses"]) == len(bf16["losses"]) == STEPS // 5
    deviations = [abs(b - a) / a for a, b in zip(fp32["losses"], bf16["losses"])]
    assert max(deviations) <= RELATIVE_TOLERANCE, list(zip(fp32["losses"], bf16["losses"]))
    # The towers did compute in bf16 (else the curves would agree for the wrong reason) and fp32 stayed fp32.
    assert bf16["computed_in"]["tower_matmul"] == ["bfloat16"]
    assert fp32["computed_in"]["tower_matmul"] == ["float32"]
    for result in (fp32, bf16):
        assert result["computed_in"]["objective_inputs"] == ["float32"]
        assert result["computed_in"]["loss"] == ["float32"]
        assert result["checkpoint_weights"] == result["checkpoint_optimizer_state"] == ["float32"]
        assert result["live_weights"] == ["float32"]


@pytest.mark.slow
def test_bf16_autocast_follows_fp32_and_keeps_fp32_state(demo_root, tmp_path):
    _check({precision: run(str(demo_root / "train"), tmp_path / precision, precision, "ddp", STEPS, OVERRIDES)
            for precision in ("fp32", "bf16")})


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_bf16_mixed_precision_follows_fp32_and_keeps_fp32_state(demo_root, tmp_path):
    script = REPO / "tests" / "dist_scripts" / "precision_runs.py"
    torchrun([str(script), str(demo_root / "train"), str(tmp_path / "runs"), str(tmp_path / "out"), "fsdp",
              str(STEPS), "data.batch_size=32", "trainer.threads_per_process=1"])
    _check(json.loads((tmp_path / "out" / "rank0.json").read_text()))
