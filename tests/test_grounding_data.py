"""The grounding canvases: drawing order, boxes and masks against hand-drawn canvases, the written layout, the CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from contrastive.cli.data import main
from contrastive.data import demo
from contrastive.data.grounding import (
    GROUNDING_SPLITS,
    MAX_ITEMS,
    MIN_ITEMS,
    build_grounding_dataset,
    canvas_caption,
    compose_canvas,
    load_grounding_split,
)


def test_compose_canvas_matches_a_hand_drawn_canvas():
    first = np.array([[0, 7, 0],
                      [7, 7, 0]], dtype=np.uint8)  # its non-zero pixels span columns 0..1, rows 0..1
    second = np.array([[0, 0],
                       [0, 9],
                       [9, 9]], dtype=np.uint8)  # non-zero: columns 0..1, rows 1..2
    # first at x=1, y=2; second at x=1, y=1, so second's pixel (x=2, y=2) lands on first's (x=2, y=2).
    canvas, mask, boxes = compose_canvas([first, second], [3, 5], [(1, 2), (1, 1)], canvas_size=5)
    expected_canvas = np.array([
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 9, 0, 0],  # first's 7 at (2, 2) overwritten by second's 9: later items win
        [0, 9, 9, 0, 0],  # second's bottom row over first's (1, 3) and (2, 3)
        [0, 0, 0, 0, 0],
    ], dtype=np.uint8)
    expected_mask = np.array([
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 6, 0, 0],
        [0, 6, 6, 0, 0],
        [0, 0, 0, 0, 0],
    ], dtype=np.uint8)
    np.testing.assert_array_equal(canvas, expected_canvas)
    np.testing.assert_array_equal(mask, expected_mask)
    # Half-open boxes of each item's non-zero pixels as placed, occlusion notwithstanding.
    np.testing.assert_array_equal(boxes, [[1, 2, 3, 4], [1, 2, 3, 4]])

    canvas, mask, boxes = compose_canvas([first], [0], [(2, 0)], canvas_size=5)
    np.testing.assert_array_equal(boxes, [[2, 0, 4, 2]])
    assert mask[0, 3] == 1 and mask[0, 2] == 0 and canvas[1, 2] == 7


def test_caption_names_every_item():
    assert canvas_caption(["bag", "dress"]) == "a picture of a bag and a dress."
    assert canvas_caption(["bag", "dress", "coat"]) == "a picture of a bag, a dress and a coat."


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grounding") / "set"
    return build_grounding_dataset(root, source=demo.DIGITS_SOURCE, seed=3, train_canvases=30, test_canvases=12,
                                   canvas_size=32)


@pytest.mark.parametrize("split", GROUNDING_SPLITS)
def test_every_canvas_agrees_with_its_boxes_labels_and_mask(built, split):
    data = load_grounding_split(built, split)
    assert data.images.shape == data.segmentation.shape == ((30 if split == "train" else 12), 32, 32)
    assert data.images.dtype == data.segmentation.dtype == np.uint8
    assert data.class_names == tuple(demo.DIGITS_CLASSNAMES)
    for image, mask, boxes, phrases, labels, caption in zip(
        data.images, data.segmentation, data.boxes, data.phrases, data.labels, data.captions
    ):
        assert MIN_ITEMS <= len(boxes) <= MAX_ITEMS and len(phrases) == len(labels) == len(boxes)
        assert len(set(labels.tolist())) == len(labels), "distinct classes, so each phrase names one box"
        assert phrases == [data.class_names[label] for label in labels]
        assert caption == canvas_caption(phrases)
        np.testing.assert_array_equal(image > 0, mask > 0)  # drawn pixels and mask pixels coincide
        assert set(np.unique(mask)) - {0} <= {label + 1 for label in labels.tolist()}
        for (x0, y0, x1, y1), label in zip(boxes, labels):
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            rows, columns = np.nonzero(mask == label + 1)
            if len(rows):  # an item's visible pixels lie inside its box
                assert x0 <= columns.min() and columns.max() < x1 and y0 <= rows.min() and rows.max() < y1
        # The last item is drawn over everything, so its box is exactly the box of its mask pixels.
        rows, columns = np.nonzero(mask == labels[-1] + 1)
        assert [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1] == boxes[-1].tolist()


def _shard_digests(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*.tar"))}


def test_same_seed_same_bytes_other_seed_other_canvases(built, tmp_path):
    again = build_grounding_dataset(tmp_path / "again", source=demo.DIGITS_SOURCE, seed=3, train_canvases=30,
                                    test_canvases=12, canvas_size=32)
    assert _shard_digests(again) == _shard_digests(built)
    other = build_grounding_dataset(tmp_path / "other", source=demo.DIGITS_SOURCE, seed=4, train_canvases=30,
                                    test_canvases=12, canvas_size=32)
    assert not np.array_equal(load_grounding_split(other, "test").images, load_grounding_split(built, "test").images)


def test_rebuild_reuses_and_other_parameters_are_refused(built):
    assert build_grounding_dataset(built, source=demo.DIGITS_SOURCE, seed=3, train_canvases=30, test_canvases=12,
                                   canvas_size=32) == built
    with pytest.raises(ValueError, match="canvas_size 32 \\(requested 48\\)"):
        build_grounding_dataset(built, source=demo.DIGITS_SOURCE, seed=3, train_canvases=30, test_canvases=12,
                                canvas_size=48)


def test_cli_builds_the_grounding_set_and_falls_back_like_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.setattr(demo, "REPO_FASHION_MNIST_DIR", tmp_path / "also-absent")
    out = tmp_path / "cli"
    assert main(["demo", "--grounding", "--out", str(out), "--train-canvases", "4", "--test-canvases", "2",
                 "--canvas-size", "24"]) == 0
    printed = capsys.readouterr().out
    assert "NOTE: Fashion-MNIST was not found" in printed and "24x24 canvases" in printed
    assert f"{out.resolve()}/train/{{0..0}}.tar" in printed
    assert load_grounding_split(out, "train").images.shape == (4, 24, 24)
    assert main(["demo", "--grounding", "--out", str(tmp_path / "bad"), "--canvas-size", "8"]) == 2
    assert "canvas_size must be at least 16" in capsys.readouterr().err
