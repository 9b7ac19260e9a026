"""Zero-shot classification: metrics against hand-computed values, dataset file parsing, result shape."""

from __future__ import annotations

import json

import pytest
import torch

from contrastive.eval.datasets import open_classification_dataset
from contrastive.eval.prompts import read_templates
from contrastive.eval.zeroshot import classification_metrics, result_record, write_result


def test_metrics_by_hand():
    # 4 samples, 6 classes. Sample 0: right at top-1. Sample 1: right at rank 2. Sample 2: right at rank 6.
    # Sample 3 (class 2): right at top-1. acc1 = 2/4, acc5 = 3/4.
    logits = torch.tensor([
        [9.0, 1, 2, 3, 4, 5],
        [9.0, 8, 1, 2, 3, 4],
        [9.0, 8, 7, 6, 5, 0],
        [0.0, 1, 9, 2, 3, 4],
    ])
    labels = torch.tensor([0, 1, 5, 2])
    metrics = classification_metrics(logits, labels)
    assert metrics["acc1"] == pytest.approx(0.5)
    assert metrics["acc5"] == pytest.approx(0.75)
    # per-class recall over classes present: class 0 -> 1, class 1 -> 0, class 2 -> 1, class 5 -> 0
    assert metrics["mean_per_class_recall"] == pytest.approx(0.5)


def test_metrics_with_fewer_than_five_classes():
    metrics = classification_metrics(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 0]))
    assert metrics == {"acc1": pytest.approx(1 / 3), "acc5": 1.0, "mean_per_class_recall": pytest.approx(0.25)}


def test_demo_dataset_in_clip_benchmark_layout(demo_root):
    dataset = open_classification_dataset(demo_root, "test")
    assert len(dataset.classnames) == 10 and dataset.urls[0].endswith("/0.tar")
    assert all("{c}" in t for t in dataset.templates)


def test_templates_accept_openai_placeholder_and_reject_missing_one(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\n\nitap of a {c}.\n")
    assert read_templates(path) == ["a photo of a {c}.", "itap of a {c}."]
    path.write_text("a photo of a {c}.\na photo.\n")
    with pytest.raises(ValueError, match="templates.txt:2: template 'a photo.' has no"):
        read_templates(path)


def test_missing_files_give_clear_errors(tmp_path, demo_root):
    with pytest.raises(ValueError, match="dataset split directory .* does not exist"):
        open_classification_dataset(tmp_path, "test")
    (tmp_path / "test").mkdir()
    with pytest.raises(ValueError, match="names no shards"):
        open_classification_dataset(tmp_path, "test")
    (tmp_path / "test" / "0.tar").write_bytes((demo_root / "test" / "0.tar").read_bytes())
    with pytest.raises(ValueError, match="class name file .*classnames.txt does not exist"):
        open_classification_dataset(tmp_path, "test")


def test_result_json_shape(tmp_path):
    record = result_record("fashion-mnist", "tiny_clip", {"acc1": 0.8, "acc5": 0.99, "mean_per_class_recall": 0.8})
    write_result(tmp_path / "out" / "zeroshot.json", record)
    loaded = json.loads((tmp_path / "out" / "zeroshot.json").read_text())
    assert loaded["task"] == "zeroshot_classification"
    assert set(loaded["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert {"dataset", "model"} <= set(loaded)
