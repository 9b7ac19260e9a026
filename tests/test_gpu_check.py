"""benchmarks/gpu_check.py: its CPU smoke run passes and reports every part, and without a GPU it refuses plainly."""

from __future__ import annotations

import importlib
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, run

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
PARTS = ("demo_data", "demo_train", "demo_zeroshot", "train_step", "loss_memory", "device_decode")


def run_gpu_check(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """The driver in a session of its own; it and everything it started are stopped on every way out (`run`)."""
    return run([sys.executable, str(SCRIPT), *args], timeout=timeout)


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_cpu_smoke_run_passes_and_reports_every_part(tmp_path):
    report_path = tmp_path / "gpu_check.json"
    result = run_gpu_check(["--device", "cpu", "--json", str(report_path)], timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["device"] == "cpu"
    assert list(report["parts"]) == list(PARTS)
    assert all(part["status"] == "passed" for part in report["parts"].values())
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", report["commit"])
    assert "gpu_check.py" in report["command"] and "--device cpu" in report["command"]
    assert report["environment"]["torch"] == torch.__version__

    figures = {name: part["figures"] for name, part in report["parts"].items()}
    assert figures["demo_data"]["train_samples"] == figures["demo_data"]["test_samples"] == 512
    assert figures["demo_train"]["steps"] == 8 and finite_positive(figures["demo_train"]["samples_per_second"])
    assert 0 <= figures["demo_zeroshot"]["acc1"] <= 1 and not figures["demo_zeroshot"]["accuracy_checked"]
    step = figures["train_step"]
    assert step["precision"] == "bf16" and step["device"] == "cpu"
    for contender in ("ours", "open_clip"):
        assert finite_positive(step["samples_per_second"][contender])
        assert finite_positive(step["peak_memory_mib"][contender])
    assert step["throughput_ratio_vs_open_clip"]["open_clip"] == 1.0
    assert finite_positive(step["throughput_ratio_vs_open_clip"]["ours"])
    assert finite_positive(step["memory_ratio_vs_open_clip"]["ours"]) and finite_positive(step["flops_per_sample"])
    assert step["mfu"] is None  # no peak FLOP/s is known for a CPU
    rows = figures["loss_memory"]["rows"]
    assert {(row["loss"], row["local_batch"]) for row in rows} == {("clip", 256), ("siglip", 256)}
    assert all(finite_positive(row["memory_ratio"]) and finite_positive(row["time_ratio"]) for row in rows)

    summary = report_path.with_suffix(".txt").read_text()
    decode = figures["device_decode"]
    assert decode["device"] == "cpu" and 0 <= decode["mae"] < decode["max_mae"]
    assert finite_positive(decode["cpu_workers_images_per_second"]) and finite_positive(decode["ratio"])
    assert "PASSED (6/6 parts)" in summary and all(name in summary for name in PARTS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    result = run_gpu_check(["--json", str(tmp_path / "gpu_check.json")], timeout=120)
    assert result.returncode == 2 and not result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device is visible" in lines[0] and "--device cpu" in lines[0]
    assert not (tmp_path / "gpu_check.json").exists()


def test_required_packages_are_pyprojects_dependencies(monkeypatch):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", dependency).group(0) for dependency in dependencies}
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    gpu_check = importlib.import_module("gpu_check")
    assert set(gpu_check.REQUIRED_PACKAGES) == names
