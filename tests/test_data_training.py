"""Bad data end to end: a shard set seeded with every kind of bad sample trains to the end with the right counts
in metrics.jsonl; `contrastive-data inspect` / `validate` report the same things."""

from __future__ import annotations

import itertools
import json
import sys
from collections import Counter

import pytest

from contrastive.cli.data import main as data_main
from contrastive.data.stream import ImageTextStream, Source, StreamLayout
from contrastive.data.transforms import build_train_transform
from contrastive.models import build_tokenizer
from tests.conftest import compose_config, run
from tests.data_factory import BAD_SAMPLES, bad_shard_set, png, write_tar

GOOD_PER_SHARD = 16


def _observed_epoch_orders(tmp_path, shard_count: int, epochs: int, seed: int) -> list[list[int]]:
    """The order the stream reads `shard_count` shards in, epoch by epoch, seen from the outside: one clean
    one-sample shard per position, keyed by its position, read by a one-sample-per-batch stream."""
    twin = tmp_path / "twin"
    twin.mkdir()
    urls = [str(write_tar(twin / f"{i}.tar", [(f"shard{i}", {"png": png(), "txt": b"a caption"})]))
            for i in range(shard_count)]
    model_cfg = compose_config(["model=test_tiny"]).model
    layout = StreamLayout(rank=0, world_size=1, num_workers=1, seed=seed, resampled=False, shuffle_buffer=0)
    stream = ImageTextStream([Source("twin", urls, 1.0)], layout, build_train_transform(28),
                             build_tokenizer(model_cfg), 28, 1)
    keys = [batch.keys[0] for batch in itertools.islice(stream, shard_count * epochs)]
    order = [int(key.removeprefix("shard")) for key in keys]
    return [order[e * shard_count:(e + 1) * shard_count] for e in range(epochs)]


def _expected_skips(shard_orders: list[list[int]], good_needed: int, readable_in_truncated: int) -> Counter:
    """Walk the shards in the observed order (shuffle buffer off) and count what is skipped before `good_needed`
    good samples.

    What each shard holds is known from how bad_shard_set wrote it: 0.tar has 8 good, the bad ones, 8 good."""
    events = [
        ["good"] * 8 + [reason for reason, _ in BAD_SAMPLES.values()] + ["good"] * 8,
        ["good"] * GOOD_PER_SHARD,
        ["good"] * readable_in_truncated + ["truncated_shard"],
        ["unreadable_shard"],
    ]
    counts: Counter = Counter()
    good = 0
    for order in shard_orders:
        for index in order:
            for event in events[index]:
                if event != "good":
                    counts[event] += 1
                    continue
                good += 1
                if good == good_needed:
                    return counts
    raise AssertionError("the observed epochs hold fewer good samples than the run needs")


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
    readable = good_per_pass - 2 * GOOD_PER_SHARD  # read from the truncated copy with tarfile by bad_shard_set
    orders = _observed_epoch_orders(tmp_path, len(shards), epochs=3, seed=0)  # the run's seed: 0
    expected = _expected_skips(orders, steps * batch, readable)
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
