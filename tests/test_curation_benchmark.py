"""benchmarks/curation_quality.py at smoke size: it corrupts the captions it says it does, reports the filter's
precision and recall as the shards it wrote show them, trains both arms at equal steps and removes planted copies
of test images. Only the mechanisms are checked here, never which arm scores higher."""

from __future__ import annotations

import importlib.util
import json
import re
import tarfile

import pytest

from contrastive.data.demo import FASHION_MNIST_CLASSNAMES, TRAIN_TEMPLATES
from tests.conftest import REPO


def _benchmark():
    spec = importlib.util.spec_from_file_location("curation_quality", REPO / "benchmarks" / "curation_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _members(directory) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} over every shard in `directory`, read with tarfile alone."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in directory.glob("*.tar"):
        with tarfile.open(shard) as archive:
            for member in archive:
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return samples


@pytest.mark.slow
def test_curation_quality_smoke_run_reports_exact_filter_figures_both_arms_and_dedup(tmp_path):
    report_path = tmp_path / "curation.json"
    assert _benchmark().main(["--smoke", "--work-dir", str(tmp_path), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert re.match(r"[0-9a-f]{40}|unknown", report["commit"])
    assert report["command"].startswith("python benchmarks/curation_quality.py --smoke")
    assert len(report["load_average_before"]) == 3

    # Corruption, recomputed from the pool shards: a caption that is no training template of its image's class.
    pool = _members(tmp_path / "curated" / "pool")
    assert len(pool) == 256
    corrupted = {key for key, files in pool.items() if files["txt"].decode() not in
                 {template.format(c=FASHION_MNIST_CLASSNAMES[json.loads(files["json"])["label"]])
                  for template in TRAIN_TEMPLATES}}
    assert len(corrupted) == round(0.4 * 256)
    assert set((tmp_path / "curated" / "corrupted.txt").read_text().split()) == corrupted

    kept = set(_members(tmp_path / "curated" / "filtered"))
    dropped = set(pool) - kept
    figures = report["filter"]
    assert figures["rule"] == "--top-fraction 0.6" and figures["kept"] == len(kept) == 154  # ceil(0.6 * 256)
    assert figures["corrupted_dropped"] == len(dropped & corrupted)
    assert figures["precision"] == len(dropped & corrupted) / len(dropped)
    assert figures["recall"] == len(dropped & corrupted) / len(corrupted)

    assert [(run["arm"], run["seed"], run["steps"]) for run in report["runs"]] == [("unfiltered", 0, 3),
                                                                                    ("filtered", 0, 3)]
    assert all(0 <= run["zeroshot_acc1"] <= 1 for run in report["runs"])
    assert report["summary"]["beyond_2_sigma"] is False  # one seed never counts

    dedup = report["dedup"]
    assert set(dedup["planted_removed"]) == {"reencoded", "resized", "cropped", "flipped"}
    assert dedup["planted_removed"]["reencoded"] == dedup["planted_removed"]["flipped"] == 2  # the easiest ones
    assert dedup["rules"][-1]["rule"].startswith("copies an evaluation image")
    assert dedup["pool_images"] == 256 and dedup["calibration"]["planted"] == 64
