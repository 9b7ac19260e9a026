"""The dense probe (contrastive.eval.dense, `contrastive-eval dense`): mIoU and patch targets against hand
computations, the whole pipeline against an oracle on synthetic canvases whose patch tokens reveal their classes,
the same patch tokens from every form an encoder is loaded in, and the CLI on grounding canvases."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contrastive.checkpoint_io import checkpoint_path
from contrastive.cli.eval import main as eval_main
from contrastive.data.grounding import build_grounding_dataset, load_grounding_split
from contrastive.data.transforms import Preprocess
from contrastive.encoders import encoder_from_model, load_encoder
from contrastive.eval.dense import (
    canvas_patch_features,
    class_iou,
    confusion_matrix,
    encoder_patch_tokens,
    fit_dense_probe,
    mean_iou,
    patch_targets,
    score_dense_probe,
)
from contrastive.export import EXPORT_FORMATS, load_vision_encoder
from contrastive.train.checkpoint import save_checkpoint
from tests.export_models import clip_style_config, randomized, siglip_style_config


@pytest.fixture
def one_thread():
    """The probes fit tiny matrices, where a second thread on a shared CPU costs more than it brings (20x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mean_iou_matches_a_hand_computation():
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    predictions = torch.tensor([0, 0, 1, 1, 1, 2, 0, 3])
    # class 0: TP 2, FP 1 (a 2 predicted 0), FN 1 (a 0 predicted 1) -> 2/4; class 1: TP 2, FP 1, FN 0 -> 2/3;
    # class 2: TP 1, FP 0, FN 2 -> 1/3; class 3: TP 0, FP 1 -> 0; class 4: absent from both, left out.
    confusion = confusion_matrix(predictions, targets, 5)
    assert confusion.sum() == 8 and confusion[2, 3] == 1 and confusion[0, 1] == 1
    iou = class_iou(confusion)
    assert iou[:4].tolist() == pytest.approx([2 / 4, 2 / 3, 1 / 3, 0.0]) and iou[4].isnan()
    assert mean_iou(confusion) == pytest.approx((2 / 4 + 2 / 3 + 1 / 3 + 0) / 4)


def test_patch_targets_take_the_class_covering_most_pixels_background_included():
    segmentation = torch.zeros(1, 4, 6, dtype=torch.uint8)  # a 2x2 grid of 2x3-pixel patches
    segmentation[0, 0, 0:2] = 3  # top-left patch: 2 of 6 pixels class 3, the rest background -> background
    segmentation[0, 0:2, 3:6] = 1  # top-right: all class 1
    segmentation[0, 2:4, 0:2] = 2  # bottom-left: 4 of 6 pixels class 2
    segmentation[0, 2, 3:5] = 2  # bottom-right: 2 class 2, 1 class 1, 3 background -> background
    segmentation[0, 3, 5] = 1
    assert patch_targets(segmentation, 2, 4).tolist() == [[[0, 1], [2, 0]]]


LEVELS = torch.tensor([0.0, 60.0, 120.0, 180.0, 240.0])  # canvas intensity of background and classes 1-4


def majority_with_tie(cell: np.ndarray) -> tuple[int, bool]:
    counts = np.bincount(cell.ravel(), minlength=len(LEVELS))
    return int(counts.argmax()), int(np.sum(counts == counts.max())) > 1


def synthetic_canvases(count: int, size: int, patch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Canvases with 1-3 rectangles of distinct classes at arbitrary pixel positions (not patch-aligned), each class
    painted at its own intensity; later rectangles cover earlier ones, as in the grounding set. A canvas with a
    patch whose majority is tied is drawn again, so every patch's class is unambiguous."""
    rng = np.random.default_rng(seed)
    segmentation = np.zeros((count, size, size), dtype=np.uint8)
    for canvas in segmentation:
        while True:
            canvas[:] = 0
            for label in rng.choice(np.arange(1, 5), size=int(rng.integers(1, 4)), replace=False):
                height, width = rng.integers(3, size // 2, size=2)
                y, x = rng.integers(0, size - height), rng.integers(0, size - width)
                canvas[y:y + height, x:x + width] = label
            if not any(majority_with_tie(canvas[row:row + patch, column:column + patch])[1]
                       for row in range(0, size, patch) for column in range(0, size, patch)):
                break
    return LEVELS.numpy()[segmentation].astype(np.uint8), segmentation


def level_fractions(images: torch.Tensor, patch: int) -> torch.Tensor:
    """A stand-in encoder: per patch, the fraction of its pixels at each class's intensity -> (B, N, 5)."""
    nearest = (images[:, :1] * 255 - LEVELS.view(1, -1, 1, 1)).abs().argmin(dim=1)  # (B, H, W)
    fractions = F.avg_pool2d(F.one_hot(nearest, len(LEVELS)).permute(0, 3, 1, 2).float(), patch)  # (B, 5, g, g)
    return fractions.flatten(2).transpose(1, 2)


def oracle_pixel_metrics(segmentation: np.ndarray, patch: int) -> tuple[float, float]:
    """Pixel accuracy and mIoU of predicting every pixel as its patch's majority class, by loops."""
    count, size, _ = segmentation.shape
    predicted = np.zeros_like(segmentation)
    for n in range(count):
        for row in range(0, size, patch):
            for column in range(0, size, patch):
                cell = segmentation[n, row:row + patch, column:column + patch]
                predicted[n, row:row + patch, column:column + patch] = majority_with_tie(cell)[0]
    ious = []
    for label in range(5):
        union = np.sum((predicted == label) | (segmentation == label))
        if union:
            ious.append(np.sum((predicted == label) & (segmentation == label)) / union)
    return float(np.mean(predicted == segmentation)), float(np.mean(ious))


def test_probe_on_tokens_that_reveal_the_classes_scores_as_the_majority_oracle(one_thread):
    size, patch = 32, 4
    preprocess = Preprocess(size, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], "nearest")  # canvases fed as they are

    def tokens(images):
        return level_fractions(images, patch)

    train_images, train_segmentation = synthetic_canvases(40, size, patch, seed=0)
    test_images, test_segmentation = synthetic_canvases(20, size, patch, seed=1)
    train = canvas_patch_features(tokens, train_images, preprocess, torch.device("cpu"), batch_size=16)
    test = canvas_patch_features(tokens, test_images, preprocess, torch.device("cpu"), batch_size=16)
    assert train.tokens.shape == (40, 8, 8, 5)
    probe = fit_dense_probe(train, patch_targets(torch.from_numpy(train_segmentation), 8, 5), 5)
    metrics = score_dense_probe(probe, test, torch.from_numpy(test_segmentation), 5)
    pixel_acc, miou = oracle_pixel_metrics(test_segmentation, patch)
    assert metrics["patch_acc"] == 1.0 and metrics["patch_miou"] == 1.0
    assert metrics["pixel_acc"] == pytest.approx(pixel_acc) and metrics["miou"] == pytest.approx(miou)
    assert miou < 1  # rectangles cross patch borders, so the pixel scores test the upsampling


@pytest.mark.parametrize("config", [clip_style_config, siglip_style_config], ids=["clip", "siglip"])
def test_every_loaded_form_of_an_encoder_gives_its_patch_tokens(tmp_path, config):
    """Our in-memory model, and its open_clip or transformers export and its bundle, give the same last-block patch
    tokens (three implementations of the tower: open_clip/timm, transformers, the bundle's rebuilt tower)."""
    model = randomized(config())
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = encoder_patch_tokens(encoder_from_model(model))(images)
        assert ours.shape == (2, 16, 32)
        for kind in ("open_clip", "transformers") if config is clip_style_config else ("transformers",):
            (tmp_path / kind).mkdir()
            EXPORT_FORMATS.get(kind)(model, tmp_path / kind)
            assert torch.allclose(encoder_patch_tokens(load_encoder(tmp_path / kind))(images), ours, atol=1e-5)
        EXPORT_FORMATS.get("bundle")(model, tmp_path)
        assert torch.allclose(load_vision_encoder(tmp_path, -1)(images).patch_tokens, ours, atol=1e-5)
        assert not torch.allclose(encoder_patch_tokens(encoder_from_model(model), -2)(images), ours, atol=1e-3)


@pytest.fixture(scope="module")
def grounding_root(tmp_path_factory):
    return build_grounding_dataset(tmp_path_factory.mktemp("grounding") / "canvases", train_canvases=60,
                                   test_canvases=30, canvas_size=28)


def test_cli_probes_a_checkpoint_and_its_bundle_alike_and_beats_all_background(tmp_path, grounding_root,
                                                                                 one_thread):
    cfg = siglip_style_config()
    model = randomized(cfg)
    checkpoint = checkpoint_path(tmp_path / "run", 1)
    save_checkpoint({"model": model.state_dict(), "config": {"name": "tiny", "model": dataclasses.asdict(cfg)},
                     "step": 1}, checkpoint, keep_last=1)
    (tmp_path / "bundle").mkdir()
    EXPORT_FORMATS.get("bundle")(model, tmp_path / "bundle")
    assert eval_main(["dense", "--checkpoint", str(checkpoint), str(tmp_path / "bundle"), "--dataset-root",
                      str(grounding_root), "--output-dir", str(tmp_path / "out"), "--no-progress", "--device",
                      "cpu"]) == 0
    records = {record["pretrained"]: record for record in
               (json.loads(path.read_text()) for path in (tmp_path / "out").glob("*.json"))}
    assert {record["task"] for record in records.values()} == {"dense_probe"}
    checkpoint_metrics = records[str(checkpoint)]["metrics"]
    bundle_metrics = records[str(tmp_path / "bundle")]["metrics"]
    assert checkpoint_metrics == pytest.approx(bundle_metrics, abs=1e-4)
    test = load_grounding_split(grounding_root, "test")
    background = float(np.mean(test.segmentation == 0))  # all-background: its IoU, the other classes' 0
    present = len(np.unique(test.segmentation))
    assert checkpoint_metrics["miou"] > background / present
    assert 0 <= checkpoint_metrics["pixel_acc"] <= 1 and 0 <= checkpoint_metrics["patch_acc"] <= 1
