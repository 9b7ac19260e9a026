"""benchmarks/data_profile.py at smoke size: every set, pipeline and stage is reported, and the stages, timed apart,
add up to within reason of the pipeline's whole loop timed around them (a mechanism, never a speed)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math

import torch

from tests.conftest import REPO

STAGES = {"read", "decode", "crop_resize", "normalise", "tokenise", "collate"}


def test_profile_smoke_run_reports_every_stage_and_the_stages_add_up(tmp_path):
    """In this process (torch and the package are imported already); the profile's one-thread setting is undone."""
    report = tmp_path / "profile.json"
    spec = importlib.util.spec_from_file_location("data_profile", REPO / "benchmarks" / "data_profile.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    threads, printed = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            benchmark.main(["--samples", "8", "--batch-size", "4", "--limit-shards",
                            "--shards-dir", str(tmp_path / "shards"), "--json", str(report)])
    finally:
        torch.set_num_threads(threads)
    figures = json.loads(report.read_text())
    assert figures["commit"] and "data_profile.py" in figures["command"] and figures["threads"] == 1
    assert set(figures["sets"]) == {"256px", "500-1000px"}
    for name, pipelines in figures["sets"].items():
        assert set(pipelines) == {"open_clip", "before_issue_18", "current"}
        assert name in printed.getvalue()
        for pipeline, profile in pipelines.items():
            stages = profile["stage_us"]
            assert set(stages) == STAGES == set(profile["share"]), pipeline
            assert all(math.isfinite(us) and us > 0 for us in stages.values()), (name, pipeline, stages)
            assert math.isclose(sum(profile["share"].values()), 1.0, rel_tol=1e-9)
            assert math.isclose(profile["sum_us"], sum(stages.values()), rel_tol=1e-9)
            assert math.isclose(profile["sum_us_without_normalise"], profile["sum_us"] - stages["normalise"],
                                rel_tol=1e-9)
            # The stages are disjoint intervals inside the loop, so they cannot exceed it (a stage timed twice
            # would). No lower bound: how much of the loop they cover depends on the machine's load.
            assert profile["sum_us"] <= profile["measured_us"], (name, pipeline)
