"""benchmarks/stages_quality.py, benchmarks/length_bucketing.py and benchmarks/distill_quality.py at smoke sizes:
they run and report what they promise (every arm over every seed, per-stage FLOPs or step times, the commit and the
command; padding and text-tower time for each way of padding). Only the mechanisms are checked here, never which
arm scores higher."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from tests.conftest import REPO


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_stages_quality_smoke_run_reports_both_arms_with_flops_commit_and_command(tmp_path):
    report_path = tmp_path / "stages.json"
    assert _benchmark("stages_quality").main(["--smoke", "--work-dir", str(tmp_path), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert re.match(r"[0-9a-f]{40}|unknown", report["commit"])
    assert report["command"].startswith("python benchmarks/stages_quality.py --smoke")
    assert [(run["arm"], run["seed"]) for run in report["runs"]] == [("fixed", 0), ("staged", 0)]
    for run in report["runs"]:
        sizes = [(stage["image_size"], stage["context_length"]) for stage in run["stages"]]
        assert sizes == ([(14, 12), (28, 16)] if run["arm"] == "staged" else [(28, 16)])
        assert run["total_flops"] == pytest.approx(sum(
            stage["flops_per_sample"] * (stage["steps"][1] - stage["steps"][0]) * 32 for stage in run["stages"]))
    summary = report["summary"]
    assert summary["staged_flops_over_fixed"] < 1  # the small stage costs less, whatever it scores
    assert all(summary[arm]["seeds"] == 1 and 0 <= summary[arm]["zeroshot_acc1_mean"] <= 1
               for arm in ("fixed", "staged"))


def test_length_bucketing_smoke_run_reports_padding_and_text_tower_time(tmp_path):
    report_path = tmp_path / "bucketing.json"
    assert _benchmark("length_bucketing").main(["--smoke", "--work-dir", str(tmp_path), "--json",
                                                str(report_path)]) == 0
    results = json.loads(report_path.read_text())["results"]
    assert list(results) == ["full_padding", "own_longest", "bucketed"]
    assert results["full_padding"]["mean_width"] == 77
    assert results["bucketed"]["padding_fraction"] <= results["own_longest"]["padding_fraction"] \
        < results["full_padding"]["padding_fraction"]
    assert all(result["text_tower_seconds_median"] > 0 for result in results.values())


@pytest.mark.slow
def test_distill_quality_smoke_run_reports_three_arms_step_times_commit_and_command(tmp_path):
    """benchmarks/distill_quality.py at smoke sizes: a teacher, its reinforced set, the three student arms."""
    report_path = tmp_path / "distill.json"
    assert _benchmark("distill_quality").main(["--smoke", "--work-dir", str(tmp_path), "--json",
                                               str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert re.match(r"[0-9a-f]{40}|unknown", report["commit"])
    assert report["command"].startswith("python benchmarks/distill_quality.py --smoke")
    assert [(run["arm"], run["seed"]) for run in report["runs"]] == [("scratch", 0), ("online", 0),
                                                                     ("reinforced", 0)]
    assert report["reinforced_set"]["size_overhead"] > 0 and report["reinforced_set"]["augmentations"] == 2
    summary = report["summary"]
    for arm in ("online", "reinforced"):
        assert summary[f"{arm}_step_time_over_scratch"] == pytest.approx(
            summary[arm]["seconds_per_step_mean"] / summary["scratch"]["seconds_per_step_mean"])
    assert all(0 <= summary[arm]["zeroshot_acc1_mean"] <= 1 for arm in ("scratch", "online", "reinforced"))
