"""`contrastive-data filter` on hand-made scores: exact kept and dropped counts per rule, every member of a kept
sample written with its similarity added to json, shard sizes evened out, the key list, the manifest; and the
`--where` grammar, which evaluates comparisons and refuses code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from contrastive.cli.data import main
from contrastive.curation.where import parse_where
from contrastive.data.loader import build_sources
from contrastive.data.stream import ImageTextStream, StreamLayout
from contrastive.data.transforms import build_train_transform
from contrastive.errors import ConfigError
from contrastive.models import build_tokenizer
from tests.conftest import compose_config
from tests.curation_helpers import read_members
from tests.data_factory import png, write_tar

SHARDS, PER_SHARD = 3, 10


def sample_files(index: int) -> dict[str, bytes]:
    files = {"png": png(), "txt": f"caption {index}".encode()}
    if index % 3 == 0:  # some samples carry img2dataset's json (with a field to keep), some do not
        files["json"] = json.dumps({"url": f"http://x/{index}"}).encode()
    if index % 4 == 0:
        files["cls"] = str(index % 10).encode()
    return files


@pytest.fixture
def scored(tmp_path) -> tuple[list[str], Path, list[dict]]:
    """Three shards of ten samples and a scores table: similarity index / 30, language en for even indices."""
    urls, rows = [], []
    for shard in range(SHARDS):
        samples = []
        for position in range(PER_SHARD):
            index = shard * PER_SHARD + position
            samples.append((f"s{index:03d}", sample_files(index)))
            rows.append({"shard": str(tmp_path / f"{shard}.tar"), "key": f"s{index:03d}", "similarity": index / 30,
                         "caption_tokens": 4 + index % 5, "language": "en" if index % 2 == 0 else "de"})
        urls.append(str(write_tar(tmp_path / f"{shard}.tar", samples)))
    scores = tmp_path / "scores.parquet"
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"model": "tiny.pt", "model_sha256": "abc"})
    pq.write_table(table, scores)
    return urls, scores, rows


def run_filter(urls, scores, out, *extra) -> int:
    return main(["filter", "::".join(urls), "--scores", str(scores), "--out", str(out), "--no-progress", *extra])


def written_samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        for name, data in read_members(shard).items():
            key, _, extension = name.partition(".")
            samples.setdefault(key, {})[extension] = data
    return samples


def test_exact_counts_members_scores_and_even_shards(tmp_path, scored):
    urls, scores, rows = scored
    out = tmp_path / "out"
    assert run_filter(urls, scores, out, "--where", "similarity >= 0.2 and language == 'en'",
                      "--samples-per-shard", "5") == 0
    kept = [row for row in rows if row["similarity"] >= 0.2 and row["language"] == "en"]
    assert len(kept) == 12  # even indices 6..28
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["scored"], manifest["kept"], manifest["dropped"]) == (30, 12, 18)
    assert manifest["rules"] == [{"rule": "similarity >= 0.2", "dropped": 6},
                                 {"rule": "language == 'en'", "dropped": 15}]
    assert (manifest["model"], manifest["model_sha256"], manifest["shards_in"]) == ("tiny.pt", "abc", urls)
    assert manifest["command"].startswith("contrastive-data filter")
    sizes = [len(read_members(shard)) and len({n.split(".")[0] for n in read_members(shard)})
             for shard in sorted(out.glob("*.tar"))]
    assert sizes == [4, 4, 4]  # 12 at most 5 a shard: three shards of four, not 5, 5, 2
    samples = written_samples(out)
    assert sorted(samples) == [row["key"] for row in kept]
    for row in kept:
        index = int(row["key"][1:])
        original = sample_files(index)
        written = samples[row["key"]]
        assert set(written) == set(original) | {"json"}
        assert all(written[ext] == data for ext, data in original.items() if ext != "json")
        metadata = json.loads(written["json"])
        assert metadata["similarity"] == pytest.approx(index / 30)
        assert metadata.get("url") == (f"http://x/{index}" if index % 3 == 0 else None)
    assert json.loads((out / "_stats.json").read_text())["samples"] == {
        "000000.tar": 4, "000001.tar": 4, "000002.tar": 4}


def test_top_fraction_and_keep_list(tmp_path, scored):
    urls, scores, rows = scored
    out = tmp_path / "keys"
    assert run_filter(urls, scores, out, "--top-fraction", "0.3", "--where", "caption_tokens != 4",
                      "--keep-list") == 0
    best = sorted(rows, key=lambda row: -row["similarity"])[:9]  # 0.3 of 30: indices 21..29
    expected = sorted(row["key"] for row in best if row["caption_tokens"] != 4)
    assert (out / "keep.txt").read_text().split() == expected
    assert not list(out.glob("*.tar"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rules"] == [{"rule": "caption_tokens != 4", "dropped": 6},
                                 {"rule": "top 0.3 by similarity", "dropped": 21}]
    assert manifest["kept"] == len(expected) == 8  # not 25


def test_where_evaluates_as_written():
    columns = {"similarity": np.array([0.1, 0.3, 0.5, 0.7]), "language": np.array(["en", "de", "en", "fr"]),
               "caption_tokens": np.array([3, 9, 12, 5])}

    def evaluate(text):
        return np.logical_and.reduce([rule.predicate(columns) for rule in parse_where(text, set(columns))]).tolist()

    assert evaluate("similarity > 0.2 and language == 'en'") == [False, False, True, False]
    assert evaluate("not (similarity < .2 or language in ('de', \"fr\"))") == [False, False, True, False]
    assert evaluate("caption_tokens >= 5 and caption_tokens <= 9 or similarity == 0.1") == [True, True, False, True]
    assert evaluate("language != 'en' and similarity >= 3e-1") == [False, True, False, True]


CODE = [
    "__import__('os').system('touch {marker}')",
    "similarity > 0 and open('{marker}', 'w')",
    "similarity.__class__ > 0",
    "similarity > 0; import os",
    "[x for x in ()]",
    "lambda: 0",
    "similarity > `id`",
    "exec('1')",
    "similarity > 0 or",
    "similarity + 1 > 0",
]


@pytest.mark.parametrize("expression", CODE)
def test_where_refuses_code(tmp_path, scored, capsys, expression):
    urls, scores, _ = scored
    marker = tmp_path / "marker"
    with pytest.raises(ConfigError):
        parse_where(expression.format(marker=marker), {"similarity", "language"})
    assert run_filter(urls, scores, tmp_path / "out", "--where", expression.format(marker=marker)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("contrastive-data filter: error: --where") and "\n" not in error
    assert not marker.exists() and not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(("command", "module", "package"), [
    (["score", "SHARDS", "--model", "m", "--out", "s.parquet"], "py3langid", "py3langid"),
    (["filter", "SHARDS", "--scores", "s.parquet", "--top-fraction", "0.5", "--out", "o"], "pyarrow", "pyarrow"),
    (["dedup", "SHARDS", "--out", "o"], "faiss", "faiss-cpu"),
    (["balance", "SHARDS", "--metadata", "m.txt", "--t", "2", "--out", "o"], "ahocorasick", "pyahocorasick"),
])
def test_without_the_extra_each_command_says_so_in_one_line(monkeypatch, capsys, command, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    assert main(command) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"{package} is missing: install the curation extra" in error


def test_image_based_filter_keeps_the_clusters_the_reference_falls_in(tmp_path, scored):
    """Embeddings in three tight groups, one per shard (directions e0, e1, e2); the reference images lie near e1
    only, so with three clusters the second shard's samples are kept, the others dropped."""
    urls, _, rows = scored
    rng = np.random.default_rng(0)
    group_of = [int(row["key"][1:]) // PER_SHARD for row in rows]
    pool = np.eye(8, dtype=np.float32)[group_of] + rng.normal(0, 0.05, (len(rows), 8)).astype(np.float32)
    scores, reference = tmp_path / "with_embeddings.parquet", tmp_path / "reference.parquet"
    pq.write_table(pa.Table.from_pylist([{**row, "image_embedding": list(map(float, vector))}
                                         for row, vector in zip(rows, pool)]), scores)
    near_e1 = np.eye(8, dtype=np.float32)[[1] * 5] + rng.normal(0, 0.05, (5, 8)).astype(np.float32)
    pq.write_table(pa.Table.from_pylist([{"shard": "ref", "key": f"r{i}", "similarity": 0.0, "caption_tokens": 1,
                                          "language": "en", "image_embedding": list(map(float, vector))}
                                         for i, vector in enumerate(near_e1)]), reference)
    out = tmp_path / "out"
    assert run_filter(urls, scores, out, "--image-reference", str(reference), "--clusters", "3",
                      "--where", "language == 'en'", "--keep-list") == 0
    assert (out / "keep.txt").read_text().split() == [f"s{index:03d}" for index in range(10, 20, 2)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rules"][1] == {"rule": "image cluster holds a reference image (3 clusters)", "dropped": 20}


def test_training_stream_reads_only_the_keep_list(tmp_path, scored):
    """The key list `filter --keep-list` writes, given as data.sources.N.keep_list: the stream yields those samples
    and no others, from the unchanged shards; an epoch-mode run refuses it with one line."""
    urls, scores, _ = scored
    out = tmp_path / "keys"
    assert run_filter(urls, scores, out, "--where", "similarity >= 0.5", "--keep-list") == 0
    kept = {f"s{index:03d}" for index in range(15, 30)}
    data = compose_config(["model=test_tiny", f"data.sources.0.shards={'::'.join(urls)}", "data.resampled=true",
                           f"+data.sources.0.keep_list={out / 'keep.txt'}"]).data
    data = OmegaConf.to_object(data)
    sources = build_sources(data)
    layout = StreamLayout(rank=0, world_size=1, num_workers=1, seed=0, resampled=True, shuffle_buffer=4)
    tokenizer = build_tokenizer(compose_config(["model=test_tiny"]).model)
    stream = ImageTextStream(sources, layout, build_train_transform(28),
                             tokenizer, 28, 5, min_image_size=8)
    iterator = iter(stream)
    seen = [key for _ in range(20) for key in next(iterator).keys]
    assert set(seen) == kept
    data.resampled = False
    with pytest.raises(ConfigError, match="keep_list needs data.resampled=true"):
        build_sources(data)
