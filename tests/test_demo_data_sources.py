"""Where the demo builder finds Fashion-MNIST: a directory given > Debian's package > the repository's copy > digits
(the digits fallback: tests/test_demo_data.py::test_falls_back_to_digits_and_says_so)."""

from __future__ import annotations

import hashlib
import re

import pytest

from contrastive.data import demo
from contrastive.data.demo import build_demo_dataset

DEBIAN_PRESENT = (demo.DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()


def test_repository_copy_is_used_without_debians(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "absent")
    dataset = build_demo_dataset(tmp_path / "out", samples_per_shard=64, limit=100)
    assert dataset.source == demo.FASHION_MNIST_SOURCE and not dataset.fell_back
    assert dataset.source_path == str(demo.REPO_FASHION_MNIST_DIR.resolve())
    assert dataset.classnames == tuple(demo.FASHION_MNIST_CLASSNAMES)


@pytest.mark.skipif(not DEBIAN_PRESENT, reason="Debian package dataset-fashion-mnist is not installed")
def test_debians_copy_comes_first(tmp_path):
    dataset = build_demo_dataset(tmp_path / "out", samples_per_shard=64, limit=100)
    assert dataset.source_path == str(demo.DEFAULT_FASHION_MNIST_DIR.resolve())


def test_repository_copy_matches_its_listed_checksums():
    listed = dict(re.findall(r"\| (\S+\.gz) \| \d+ \| ([0-9a-f]{64}) \|",
                             (demo.REPO_FASHION_MNIST_DIR / "README.md").read_text()))
    assert len(listed) == 4
    for name, digest in listed.items():
        assert hashlib.sha256((demo.REPO_FASHION_MNIST_DIR / name).read_bytes()).hexdigest() == digest
