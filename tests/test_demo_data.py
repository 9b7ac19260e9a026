"""The demo data builder: idx parsing, the digits fallback, the shard layout, idempotent rebuilds and the CLI."""

from __future__ import annotations

import gzip
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from contrastive.cli.data import main
from contrastive.data import demo
from contrastive.data.demo import (
    EVAL_TEMPLATES,
    FASHION_MNIST_CLASSNAMES,
    TRAIN_TEMPLATES,
    build_demo_dataset,
    load_demo_dataset,
)

SAMPLE_FIELDS = {"png", "txt", "json", "cls"}


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in idx format, gzipped when the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


@pytest.fixture
def tiny_idx_dir(tmp_path: Path) -> Path:
    """Ten train and six test 28x28 images whose pixels encode (index, label); train gzipped, test not."""
    directory = tmp_path / "idx"
    directory.mkdir()
    for split, count, suffix in (("train", 10, ".gz"), ("t10k", 6, "")):
        labels = (np.arange(count) * 3) % 10
        images = np.zeros((count, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(count)
        images[:, 5:20, 5:20] = (labels * 20 + 40)[:, None, None]
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return directory


def read_split(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False))


def check_split(dataset: demo.DemoDataset, split: str) -> list[dict]:
    """Check every sample of a split against the layout the builder promises; returns the samples."""
    pattern = dataset.train_shards if split == "train" else dataset.test_shards
    templates = TRAIN_TEMPLATES if split == "train" else EVAL_TEMPLATES
    samples = read_split(pattern)
    assert len(samples) == (dataset.train_count if split == "train" else dataset.test_count)
    shard_count = dataset.train_shard_count if split == "train" else dataset.test_shard_count
    assert pattern == f"{dataset.root}/{split}/{{0..{shard_count - 1}}}.tar"
    assert sorted(p.name for p in (dataset.root / split).glob("*.tar")) == sorted(
        f"{i}.tar" for i in range(shard_count)
    )
    assert (dataset.root / split / "nshards.txt").read_text().strip() == str(shard_count)
    for sample in samples:
        assert {name for name in sample if not name.startswith("__")} == SAMPLE_FIELDS
        key = sample["__key__"]
        assert key.startswith(f"{split}_") and len(key) == len(split) + 10
        label = int(sample["cls"].decode("ascii"))
        metadata = json.loads(sample["json"])
        caption = sample["txt"].decode("utf-8")
        classname = dataset.classnames[label]
        assert caption in {template.format(c=classname) for template in templates}
        assert metadata["key"] == key and metadata["split"] == split
        assert metadata["label"] == label and metadata["classname"] == classname
        assert metadata["caption"] == caption and metadata["source"] == dataset.source
        assert key == f"{split}_{metadata['index']:09d}"
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.format == "PNG" and image.mode == "L"
        assert image.size == (metadata["width"], metadata["height"]) == (28, 28)
    return samples


def check_dataset(dataset: demo.DemoDataset) -> None:
    train = check_split(dataset, "train")
    test = check_split(dataset, "test")
    keys = [sample["__key__"] for sample in train + test]
    assert len(keys) == len(set(keys))
    root = dataset.root
    assert (root / "classnames.txt").read_text().splitlines() == list(dataset.classnames)
    assert (root / "zeroshot_classification_templates.txt").read_text().splitlines() == EVAL_TEMPLATES
    assert (root / "dataset_type.txt").read_text().strip() == "classification"
    info = json.loads((root / "info.json").read_text())
    assert info["source"]["fell_back"] == dataset.fell_back
    assert info["eval_templates"] == EVAL_TEMPLATES and info["train_templates"] == TRAIN_TEMPLATES


def test_template_sets_are_disjoint_and_use_the_placeholder():
    assert not set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES)
    assert all("{c}" in template for template in TRAIN_TEMPLATES + EVAL_TEMPLATES)
    assert len(FASHION_MNIST_CLASSNAMES) == 10


@pytest.mark.skipif(
    not (demo.DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_builds_from_real_fashion_mnist(tmp_path):
    dataset = build_demo_dataset(tmp_path / "fm", samples_per_shard=64, limit=200)
    assert dataset.source == demo.FASHION_MNIST_SOURCE and not dataset.fell_back
    assert dataset.classnames == tuple(FASHION_MNIST_CLASSNAMES)
    assert (dataset.train_count, dataset.train_shard_count) == (200, 4)  # 64 + 64 + 64 + 8
    assert (dataset.test_count, dataset.test_shard_count) == (200, 7)  # test shards hold 32
    check_dataset(dataset)


def test_parses_synthetic_idx_files_pixel_for_pixel(tiny_idx_dir, tmp_path):
    dataset = build_demo_dataset(tmp_path / "out", source=tiny_idx_dir, samples_per_shard=4)
    assert (dataset.train_count, dataset.train_shard_count) == (10, 3)
    assert (dataset.test_count, dataset.test_shard_count) == (6, 3)
    assert dataset.source_path == str(tiny_idx_dir.resolve())
    check_dataset(dataset)
    for split, count in (("train", 10), ("test", 6)):
        pattern = dataset.train_shards if split == "train" else dataset.test_shards
        for position, sample in enumerate(read_split(pattern)):
            pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
            label = (position * 3) % 10
            assert pixels[0, 0] == position and pixels[10, 10] == label * 20 + 40
            assert int(sample["cls"]) == label
        assert position == count - 1


def test_limit_keeps_the_first_samples_of_each_split(tiny_idx_dir, tmp_path):
    dataset = build_demo_dataset(tmp_path / "out", source=tiny_idx_dir, samples_per_shard=4, limit=3)
    assert (dataset.train_count, dataset.test_count) == (3, 3)
    keys = [sample["__key__"] for sample in read_split(dataset.train_shards)]
    assert keys == ["train_000000000", "train_000000001", "train_000000002"]


def test_falls_back_to_digits_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(demo, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.setattr(demo, "REPO_FASHION_MNIST_DIR", tmp_path / "also-absent")
    with caplog.at_level(logging.WARNING, logger="contrastive.data.demo"):
        dataset = build_demo_dataset(tmp_path / "digits", samples_per_shard=100, limit=150)
    assert dataset.fell_back and dataset.source == demo.DIGITS_SOURCE
    assert "FALLING BACK" in caplog.text and "also-absent" in caplog.text, "it names where it looked"
    assert dataset.classnames == tuple(demo.DIGITS_CLASSNAMES)
    assert (dataset.train_shard_count, dataset.test_shard_count) == (2, 3)
    check_dataset(dataset)


def test_digits_split_is_stratified_and_deterministic():
    first, second = demo.load_digits(), demo.load_digits()
    train, test = first.splits["train"], first.splits["test"]
    assert np.array_equal(train.source_indices, second.splits["train"].source_indices)
    assert not set(train.source_indices) & set(test.source_indices)
    assert abs(len(test.labels) / (len(train.labels) + len(test.labels)) - 0.2) < 0.01
    test_share_per_class = np.bincount(test.labels) / np.bincount(np.concatenate([train.labels, test.labels]))
    assert np.all(np.abs(test_share_per_class - 0.2) < 0.03)
    assert train.images.shape[1:] == (28, 28) and train.images.dtype == np.uint8
    assert train.images.max() == 255


def test_rebuild_with_same_parameters_returns_existing(tiny_idx_dir, tmp_path, caplog):
    first = build_demo_dataset(tmp_path / "out", source=tiny_idx_dir, samples_per_shard=4)
    shard = tmp_path / "out" / "train" / "0.tar"
    written_at = shard.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="contrastive.data.demo"):
        second = build_demo_dataset(tmp_path / "out", source=tiny_idx_dir, samples_per_shard=4)
    assert second == first == load_demo_dataset(tmp_path / "out")
    assert shard.stat().st_mtime_ns == written_at
    assert "reusing" in caplog.text
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_existing_directory_with_other_parameters_raises(tiny_idx_dir, tmp_path):
    build_demo_dataset(tmp_path / "out", source=tiny_idx_dir, samples_per_shard=4)
    with pytest.raises(ValueError, match=r"seed 0 \(requested 1\).*Delete it"):
        build_demo_dataset(tmp_path / "out", source=tiny_idx_dir, samples_per_shard=4, seed=1)


def test_incomplete_or_foreign_directory_raises(tiny_idx_dir, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("user data")
    with pytest.raises(ValueError, match="no info.json"):
        build_demo_dataset(foreign, source=tiny_idx_dir)
    assert (foreign / "notes.txt").read_text() == "user data"

    built = build_demo_dataset(tmp_path / "out", source=tiny_idx_dir, samples_per_shard=4)
    (built.root / "test" / "2.tar").unlink()
    with pytest.raises(ValueError, match=r"incomplete \(missing test/2.tar\)"):
        build_demo_dataset(tmp_path / "out", source=tiny_idx_dir, samples_per_shard=4)


def test_empty_output_directory_is_used(tiny_idx_dir, tmp_path):
    (tmp_path / "out").mkdir()
    dataset = build_demo_dataset(tmp_path / "out", source=tiny_idx_dir, samples_per_shard=4)
    assert dataset.train_count == 10


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda raw: raw[:-5], "header declares shape"),
        (lambda raw: b"\x00\x00\x0d\x03" + raw[4:], "magic number"),
        (lambda raw: b"", "magic number missing"),
    ],
)
def test_malformed_idx_file_raises_naming_the_file(tiny_idx_dir, tmp_path, corrupt, message):
    path = tiny_idx_dir / "t10k-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as error:
        build_demo_dataset(tmp_path / "out", source=tiny_idx_dir)
    assert str(path) in str(error.value)
    assert not (tmp_path / "out").exists()


def test_corrupt_gzip_and_missing_file_raise_naming_the_file(tiny_idx_dir, tmp_path):
    gzipped = tiny_idx_dir / "train-labels-idx1-ubyte.gz"
    gzipped.write_bytes(gzipped.read_bytes()[:20])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        build_demo_dataset(tmp_path / "out", source=tiny_idx_dir)
    gzipped.unlink()
    with pytest.raises(ValueError, match="missing train-labels-idx1-ubyte"):
        build_demo_dataset(tmp_path / "out", source=tiny_idx_dir)


def test_cli_builds_and_prints_the_train_pattern(tiny_idx_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["demo", "--source", str(tiny_idx_dir), "--out", str(out), "--samples-per-shard", "4", "--limit", "8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{out}/train/{{0..1}}.tar" in printed
    assert "train: 8 samples in 2 shards" in printed
    assert load_demo_dataset(out).test_shard_count == 3  # the 6 test samples, 2 per shard


def test_cli_bad_source_exits_2_with_one_line(tmp_path, capsys):
    assert main(["demo", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "nowhere" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()
