"""benchmarks/locca_quality.py at smoke size: it runs both arms and reports what it promises (grounding probe and
zero-shot per run, the decoder's referring accuracy for LocCa runs only, mean and std per arm, the 2-sigma verdict,
the commit and the command). Which arm scores higher is never checked here."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_locca_quality_smoke_run_reports_both_arms_commit_and_command(tmp_path):
    spec = importlib.util.spec_from_file_location("locca_quality", REPO / "benchmarks" / "locca_quality.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    report_path = tmp_path / "locca.json"
    assert benchmark.main(["--smoke", "--work-dir", str(tmp_path), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert re.match(r"[0-9a-f]{40}|unknown", report["commit"])
    assert report["command"].startswith("python benchmarks/locca_quality.py --smoke")
    assert [(run["arm"], run["seed"]) for run in report["runs"]] == [("sigmoid", 0), ("sigmoid_locca", 0)]
    for run in report["runs"]:
        assert 0 <= run["probe_acc_iou50"] <= 1 and 0 <= run["zeroshot_acc1"] <= 1
        assert ("decoder_referring_acc_iou50" in run) == (run["arm"] == "sigmoid_locca")
    summary = report["summary"]
    assert all(summary[arm]["seeds"] == 1 for arm in ("sigmoid", "sigmoid_locca"))
    assert set(summary["probe_acc_iou50_difference"]) == {"locca_minus_sigmoid", "sigma", "beyond_2_sigma"}
    assert len(report["load_average"]["before"]) == 3
