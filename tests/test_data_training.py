"""Bad data end to end: a shard set seeded with every kind of bad sample trains to the end with the right counts
in metrics.jsonl; `contrastive-data inspect` / `validate` report the same things."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from contrastive.cli.data import main as data_main
from contrastive.data.shards import shards_for_slot
from tests.conftest import run
from tests.data_factory import BAD_SAMPLES, bad_shard_set

GOOD_PER_SHARD = 16


def _expected_skips(shards: list[str], good_needed: int, readable_in_truncated: int) -> Counter:
    """Walk the epochs' shard order (shuffle buffer off) and count what is skipped before `good_needed` good samples.

    What each shard holds is known from how bad_shard_set wrote it: 0.tar has 8 good, the bad ones, 8 good."""
    events = {
        shards[0]: ["good"] * 8 + [reason for reason, _ in BAD_SAMPLES.values()] + ["good"] * 8,
        shards[1]: ["good"] * GOOD_PER_SHARD,
        shards[2]: ["good"] * readable_in_truncated + ["truncated_shard"],
        shards[3]: ["unreadable_shard"],
    }
    counts: Counter = Counter()
    good, epoch = 0, 0
    while True:
        for url in shards_for_slot(shards, epoch=epoch, rank=0, world_size=1, worker=0, num_workers=1, seed=0,
                                   resampled=False):
            for event in events[url]:
                if event != "good":
                    counts[event] += 1
                    continue
                good += 1
                if good == good_needed:
                    return counts
        epoch += 1


@pytest.mark.slow
def test_bad_shard_set_trains_to_the_end_with_the_right_counts(tmp_path):
    shards, per_pass, good_per_pass = bad_shard_set(tmp_path / "shards", GOOD_PER_SHARD)
    shards[-1] = f"pipe:cat {shards[-1]}"  # an opener that fails at its first read
    steps, batch = 6, 16  # 96 good samples: two full passes and part of a third
    run_dir = tmp_path / "run"
    overrides = [
        "model=test_tiny", "debug=tiny", f"run_dir={run_dir}", "trainer.threads_per_process=1",
        f"data.sources.0.shards='{'::'.join(shards)}'", "data.resampled=false", "data.shuffle_buffer=0",
        "data.max_skip_fraction=0.5", f"trainer.max_steps={steps}", f"data.batch_size={batch}",
    ]
    result = run([sys.executable, "-m", "contrastive.cli.train", *overrides], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == steps
    expected = _expected_skips(shards, steps * batch, good_per_pass - 2 * GOOD_PER_SHARD)
    assert set(expected) == set(per_pass), "the run must meet every kind of bad data"
    reported = {key.split("/", 1)[1]: int(value) for key, value in rows[-1].items() if key.startswith("data_skipped/")}
    assert reported == dict(expected)
    assert rows[-1]["data_skipped_samples"] == sum(expected.values())
    log = (run_dir / "train_rank0.log").read_text()
    assert "skipping sample" in log and "unreadable_shard" in log  # and the logs name them


def test_inspect_counts_and_lists_bad_samples_and_validate_fails(tmp_path, capsys):
    shards, per_pass, good = bad_shard_set(tmp_path / "shards", GOOD_PER_SHARD)
    present = "::".join(shards[:3])
    assert data_main(["inspect", present, "--no-progress", "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["good"] == good and report["shards"] == 3
    assert report["bad"] == {reason: 1 for reason in per_pass if reason != "unreadable_shard"}
    assert {key for _, key, _ in report["bad_samples"]} >= set(BAD_SAMPLES)
    assert "image width: min 28" in capsys.readouterr().out
    assert data_main(["validate", present, "--no-progress"]) == 1
    assert data_main(["validate", f"pipe:cat {shards[1]}", "--no-progress"]) == 0
    assert data_main(["validate", shards[3], "--no-progress"]) == 1  # cannot be opened
