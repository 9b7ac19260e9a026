"""benchmarks/self_distillation_quality.py at smoke size: it runs both arms, the self-distillation arm really
switches its terms on, and it reports what it promises (dense-probe, grounding-probe and zero-shot metrics per run,
mean and std per arm, the 2-sigma verdict, the commit and the command). Only the mechanisms are checked, never which
arm wins."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_self_distillation_quality_smoke_run_reports_both_arms_and_the_two_sigma_rule(tmp_path):
    spec = importlib.util.spec_from_file_location("self_distillation_quality",
                                                  REPO / "benchmarks" / "self_distillation_quality.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    report_path = tmp_path / "report.json"
    assert benchmark.main(["--smoke", "--work-dir", str(tmp_path), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert re.match(r"[0-9a-f]{40}|unknown", report["commit"])
    assert report["command"].startswith("python benchmarks/self_distillation_quality.py --smoke")
    assert [(run["arm"], run["seed"]) for run in report["runs"]] == [("sigmoid", 0), ("siglip2", 0)]
    for run in report["runs"]:
        assert all(0 <= run[metric] <= 1 for metric in ("dense_miou", "dense_pixel_acc", "grounding_acc_iou50",
                                                        "grounding_mean_iou", "zeroshot_acc1"))
    # The terms were on from the switch step (1 of 3) in the siglip2 arm only: its metrics log them.
    logged = {arm: [row for row in map(json.loads, (tmp_path / "runs" / f"{arm}_seed0" / "metrics.jsonl")
                                       .read_text().splitlines()) if "loss" in row]  # training steps, not evals
              for arm in ("sigmoid", "siglip2")}
    assert [("distill/teacher_entropy" in row) for row in logged["siglip2"]] == [False, True, True]
    assert not any("distill/teacher_entropy" in row for row in logged["sigmoid"])
    summary = report["summary"]
    assert summary["sigmoid"]["seeds"] == summary["siglip2"]["seeds"] == 1
    for metric in ("dense_miou", "grounding_acc_iou50"):
        difference = summary["siglip2"][f"{metric}_mean"] - summary["sigmoid"][f"{metric}_mean"]
        assert summary[f"{metric}_siglip2_minus_sigmoid"] == pytest.approx(difference)
        assert summary[f"{metric}_difference_counts"] is False  # one seed has no spread: nothing counts
        assert summary["sigmoid"][f"{metric}_std"] == summary["siglip2"][f"{metric}_std"] == 0.0
