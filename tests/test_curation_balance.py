"""`contrastive-data balance` (MetaCLIP) on a hand-computed example: entries cat, dog, sun, bird over eight
captions. Substring matches: cat in four captions (one of them "catalog"), dog in one, sun in two, bird in none;
"A Cat" matches nothing (matching is case-sensitive). With t=2 an entry is drawn with probability
min(1, 2/N): cat 1/2, dog 1, sun 1. So k2 (cat and dog), k4 and k5 (sun) are always kept, k0, k1 and k3 half the
time each, k6 and k7 never."""

from __future__ import annotations

import json

import pytest

from contrastive.cli.data import main
from contrastive.curation.balance import balance
from tests.curation_helpers import read_members
from tests.data_factory import png, write_tar

CAPTIONS = {"k0": "a cat on a mat", "k1": "my cat", "k2": "cat and dog", "k3": "the catalog", "k4": "sunny day",
            "k5": "the sun", "k6": "nothing here", "k7": "A Cat"}
ENTRIES = ["cat", "dog", "sun", "bird"]


@pytest.fixture
def pool(tmp_path):
    image = png()
    samples = [(key, {"png": image, "txt": caption.encode()}) for key, caption in CAPTIONS.items()]
    shards = [write_tar(tmp_path / "0.tar", samples[:5]), write_tar(tmp_path / "1.tar", samples[5:])]
    metadata = tmp_path / "entries.txt"
    metadata.write_text("\n".join(ENTRIES) + "\n")
    return [str(shard) for shard in shards], metadata


def kept_keys(result) -> set[str]:
    return {key for _, key in result.selection.kept}


def test_hand_computed_example(tmp_path, pool, capsys):
    urls, metadata = pool
    out = tmp_path / "out"
    assert main(["balance", "::".join(urls), "--metadata", str(metadata), "--t", "2", "--seed", "7",
                 "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    written = {name.split(".")[0]: data for shard in out.glob("*.tar") for name, data in read_members(shard).items()
               if name.endswith(".json")}
    assert {"k2", "k4", "k5"} <= set(written) <= {"k0", "k1", "k2", "k3", "k4", "k5"}
    assert json.loads(written["k2"])["metaclip_entries"] == ["cat", "dog"]
    cats_kept = len(set(written) & {"k0", "k1", "k3"})
    assert manifest["entry_histogram"] == {"cat": [4, 1 + cats_kept], "sun": [2, 2], "dog": [1, 1]}
    assert manifest["rules"] == [
        {"rule": "matches no entry", "dropped": 2},
        {"rule": "no matched entry drawn with probability min(1, 2 / N_entry)", "dropped": 3 - cats_kept}]
    assert manifest["kept"] == len(written) == 3 + cats_kept

    # The same seed gives the same pairs; t above every count keeps every matched pair.
    assert kept_keys(balance(urls, ENTRIES, 2, seed=7, progress=False)) == set(written)
    assert kept_keys(balance(urls, ENTRIES, 10, seed=7, progress=False)) == {"k0", "k1", "k2", "k3", "k4", "k5"}


def test_each_cat_pair_is_kept_half_the_time(pool):
    urls, _ = pool
    seeds = 400
    counts = dict.fromkeys(CAPTIONS, 0)
    for seed in range(seeds):
        for key in kept_keys(balance(urls, ENTRIES, 2, seed=seed, progress=False)):
            counts[key] += 1
    assert counts["k2"] == counts["k4"] == counts["k5"] == seeds and counts["k6"] == counts["k7"] == 0
    for key in ("k0", "k1", "k3"):  # binomial(400, 1/2): standard deviation 10
        assert abs(counts[key] - seeds / 2) <= 40, counts
