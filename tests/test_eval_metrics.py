"""Retrieval and probe metrics against hand-computed values; class-name/template parsing; bad input messages."""

from __future__ import annotations

import tarfile

import pytest
import torch

from contrastive.eval.datasets import check_shards_not_empty, open_classification_dataset
from contrastive.eval.linear_probe import fit_probe, full_probe, sample_per_class
from contrastive.eval.prompts import load_classnames, load_templates
from contrastive.eval.retrieval import retrieval_metrics, split_captions


def test_retrieval_recall_by_hand():
    # 3 images on axes; 4 captions: two for image 0, one each for images 1 and 2.
    images = torch.eye(3)
    texts = torch.tensor([
        [1.0, 0.5, 0.0],  # image 0: ranks images 0, 1, 2 -> hit @1
        [0.0, 1.0, 0.2],  # image 0: ranks 1, 2, 0 -> its image is 3rd -> hit @5 only
        [0.0, 0.9, 0.1],  # image 1: ranks 1 first -> hit @1
        [0.9, 0.0, 0.1],  # image 2: ranks 0, 2, 1 -> 2nd
    ])
    owners = torch.tensor([0, 0, 1, 2])
    metrics = retrieval_metrics(images, texts, owners, ks=(1, 2, 5))
    # caption queries: @1 hits for captions 0 and 2 -> 2/4; @2 adds caption 3 -> 3/4; @5 (capped at 3) -> 4/4
    assert metrics["image_retrieval_recall@1"] == pytest.approx(0.5)
    assert metrics["image_retrieval_recall@2"] == pytest.approx(0.75)
    assert metrics["image_retrieval_recall@5"] == 1.0
    # image queries (scores = column of texts): image 0 -> captions by score 0 (1.0), 3 (0.9): top-1 is caption 0,
    # its own -> hit. image 1 -> captions 1 (1.0), 2 (0.9): top-1 is caption 1 (image 0's) -> miss @1, hit @2.
    # image 2 -> captions 1 (0.2), 2 (0.1), 3 (0.1): top-1 caption 1 -> miss @1; top-2 {1, 2 or 3} by topk order.
    assert metrics["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert metrics["text_retrieval_recall@5"] == 1.0


def test_retrieval_chunking_does_not_change_results():
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(7, 4, generator=generator), torch.randn(15, 4, generator=generator)
    owners = torch.arange(15) % 7
    assert retrieval_metrics(images, texts, owners, chunk=2) == retrieval_metrics(images, texts, owners, chunk=100)


def test_captions_one_per_line_and_missing_caption():
    texts, owners = split_captions(["a dog\na brown dog\n", "a cat"], ["k0", "k1"])
    assert texts == ["a dog", "a brown dog", "a cat"] and owners.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="retrieval sample k1 has no caption"):
        split_captions(["a dog", "  \n"], ["k0", "k1"])


def test_builtin_lists_have_their_standard_sizes():
    assert len(load_classnames("imagenet1k")) == 1000
    assert load_classnames("imagenet1k")[:3] == ["tench", "goldfish", "great white shark"]
    assert load_classnames("cifar10")[0] == "airplane" and len(load_classnames("cifar10")) == 10
    assert len(set(load_classnames("cifar100"))) == 100
    templates = load_templates("openai_imagenet")
    assert len(templates) == 80 and len(set(templates)) == 80 and all("{c}" in t for t in templates)


def test_classname_and_template_files(tmp_path):
    (tmp_path / "names.txt").write_text("cat\n\n  dog \n")
    assert load_classnames(str(tmp_path / "names.txt")) == ["cat", "dog"]
    (tmp_path / "t.txt").write_text("a {} photo.\n")
    assert load_templates(str(tmp_path / "t.txt")) == ["a {c} photo."]
    with pytest.raises(ValueError, match="is neither a file nor a built-in list"):
        load_classnames(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_text("a photo\n")
    with pytest.raises(ValueError, match="bad.txt:1: template 'a photo' has no"):
        load_templates(str(tmp_path / "bad.txt"))


def test_empty_shards_are_named(tmp_path):
    (tmp_path / "0.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="0.tar is empty \\(0 bytes\\)"):
        check_shards_not_empty([str(tmp_path / "0.tar")])
    with tarfile.open(tmp_path / "1.tar", "w"):
        pass
    with pytest.raises(ValueError, match="1.tar is empty \\(a tar archive with no samples\\)"):
        check_shards_not_empty([str(tmp_path / "1.tar")])


def test_image_folder_layout(tmp_path):
    from PIL import Image

    for cls in ("ankle_boot", "bag"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / cls / "a.png")
    dataset = open_classification_dataset(tmp_path, "val", templates="simple")
    assert dataset.classnames == ["ankle boot", "bag"] and [label for _, label in dataset.images] == [0, 1]
    with pytest.raises(ValueError, match="has no zeroshot_classification_templates.txt"):
        open_classification_dataset(tmp_path, "val")
    with pytest.raises(ValueError, match="10 class names for 2 class folders"):
        open_classification_dataset(tmp_path, "val", classnames="cifar10", templates="simple")


def test_k_shot_sampling_is_per_class_and_reproducible():
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    first = sample_per_class(labels, 2, seed=3)
    assert torch.equal(first, sample_per_class(labels, 2, seed=3))
    assert torch.bincount(labels[first]).tolist() == [2, 2, 2]
    rest = sample_per_class(labels, 3, seed=4, exclude=first)
    assert not set(first.tolist()) & set(rest.tolist())
    with pytest.raises(ValueError, match="fewer than the 4 asked for"):
        sample_per_class(labels, 4, seed=0, exclude=first)


def test_probe_separates_separable_classes_and_prior_dominates_under_strong_penalty():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    labels = torch.arange(3).repeat(40)
    features = centers[labels] + 0.3 * torch.randn(120, 2, generator=generator)
    result = full_probe((features, labels), (features, labels), 3)
    assert result["acc1"] == 1.0
    # A huge penalty towards a prior that swaps classes 0 and 1 keeps the probe at the (wrong) prior.
    prior = 10 * centers[[1, 0, 2]]
    probe = fit_probe(features, labels, features, labels, 3, weight_decays=[1e4], prior=prior)
    assert torch.allclose(probe.weight, prior, atol=0.05)
    assert probe.evaluate(features, labels)["acc1"] == pytest.approx(1 / 3)
