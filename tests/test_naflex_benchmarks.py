"""benchmarks/naflex_throughput.py at smoke size: it runs and reports what it promises (both arms, padding, tokens
per image, ratios measured in the same run, the command). Only the mechanism is checked, never which arm is faster."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_naflex_throughput_smoke_run_reports_both_arms_padding_and_ratios(tmp_path):
    report_path = tmp_path / "naflex_throughput.json"
    assert _benchmark("naflex_throughput").main(["--smoke", "--work-dir", str(tmp_path), "--json",
                                                 str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["command"].startswith("python benchmarks/naflex_throughput.py --smoke")
    result = report["results"]["16"]
    assert result["fixed"]["padding_fraction"] == 0 and 0 <= result["naflex"]["padding_fraction"] < 1
    assert result["fixed"]["tokens_per_image"] == 16 and result["naflex"]["tokens_per_image"] <= 16
    for key, ratio in result["naflex_over_fixed"].items():
        assert ratio == pytest.approx(result["naflex"][key] / result["fixed"][key])
