"""The grounding demo set: Fashion-MNIST items placed on blank canvases, each with its box, phrase and mask.

Owns composing the canvases, writing them as img2dataset-layout shards under ``ROOT/train`` and ``ROOT/test``
(plus ``ROOT/classes.json``), and reading a split back as arrays for evaluation code. The items come from the
same source as the classification demo set (contrastive.data.demo), falling back to scikit-learn's digits in
the same way when Fashion-MNIST is absent.

Per sample: ``KEY.png`` the greyscale canvas, ``KEY.txt`` a caption naming every item, ``KEY.json`` with
``{"boxes": [[x0, y0, x1, y1], ...], "phrases": [...], "labels": [...]}`` and ``KEY.seg.png`` holding, per
pixel, the class id + 1 of the item drawn there (0 = background).

Box convention (the same everywhere in contrastive): integer pixel coordinates, x to the right, y down, origin
at the top-left corner of the top-left pixel, half-open: a box covers the pixels x0 <= x < x1 and y0 <= y < y1,
so its width is x1 - x0 and a box spanning the whole canvas is [0, 0, W, H]. Each box is the tight box of its
item's non-zero pixels as placed. Items are drawn in order; an item's non-zero pixels replace whatever lies
under them, in the canvas and in the mask, so where items overlap the later one wins.

Every canvas holds items of distinct classes, so a phrase (the class name) refers to exactly one box.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from contrastive.data import demo
from contrastive.errors import ConfigError, InputError

# Bump when the written layout or content changes, so an old directory is not mistaken for a current one.
GROUNDING_BUILDER_VERSION = 1
GROUNDING_SPLITS = ("train", "test")
MIN_ITEMS, MAX_ITEMS = 2, 4  # items per canvas
# An item's side before trimming, as a fraction of the canvas side: big enough to stay recognisable at 64 px,
# small enough that four fit.
ITEM_SIDE_FRACTIONS = (0.25, 0.5)
# A placement is redrawn when it covers more than this fraction of an earlier item's box, so no item is hidden.
MAX_OVERLAP_FRACTION = 0.3
_PLACEMENT_TRIES = 50
_SAMPLES_PER_SHARD = 1000


@dataclass(frozen=True)
class GroundingSplit:
    """One split of a grounding set, in key order. Boxes follow the module's half-open pixel convention."""

    images: np.ndarray  # (N, H, W) uint8 canvases
    segmentation: np.ndarray  # (N, H, W) uint8: class id + 1 of the item drawn at each pixel, 0 = background
    boxes: list[np.ndarray]  # N arrays of shape (K_i, 4) int64 [x0, y0, x1, y1]
    phrases: list[list[str]]  # N lists of K_i phrases
    labels: list[np.ndarray]  # N arrays of shape (K_i,) int64 class ids
    captions: list[str]
    class_names: tuple[str, ...]
    keys: list[str]


def build_grounding_dataset(
    root: str | Path,
    *,
    source: str | Path | None = None,
    seed: int = 0,
    train_canvases: int = 2000,
    test_canvases: int = 500,
    canvas_size: int = 64,
) -> Path:
    """Write the grounding canvases to `root` and return it, or return an existing build with the same parameters.

    `source` is as for contrastive.data.demo.build_demo_dataset: an idx directory, "sklearn-digits", or None for
    Fashion-MNIST where installed with the digits as fallback. Train canvases draw items from the source's train
    split, test canvases from its test split, so no item image is shared between them.
    """
    if train_canvases < 1 or test_canvases < 1:
        raise ConfigError(f"train_canvases and test_canvases must be positive, got {train_canvases}, {test_canvases}")
    if canvas_size < 16:
        raise ConfigError(f"canvas_size must be at least 16 pixels so {MAX_ITEMS} items fit, got {canvas_size}")
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    root = Path(root).expanduser().resolve()
    source_name, source_path, fell_back = demo.resolve_source(source)
    parameters = {
        "builder_version": GROUNDING_BUILDER_VERSION,
        "source": source_name,
        "source_path": source_path,
        "seed": seed,
        "train_canvases": train_canvases,
        "test_canvases": test_canvases,
        "canvas_size": canvas_size,
    }
    if root.exists():
        if not root.is_dir():
            raise InputError(f"output path {root} exists and is not a directory")
        if any(root.iterdir()):
            _check_existing(root, parameters)
            return root
    data = demo.load_fashion_mnist(source_path) if source_name == demo.FASHION_MNIST_SOURCE else demo.load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed at the end, so an interrupted build never leaves a half-written root.
    staging = root.parent / f".{root.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        counts = {"train": train_canvases, "test": test_canvases}
        for split_number, split in enumerate(GROUNDING_SPLITS):
            rng = np.random.default_rng([seed, split_number])
            _write_split(staging / split, split, data, counts[split], canvas_size, rng)
        description = {
            "builder_version": GROUNDING_BUILDER_VERSION,
            "parameters": parameters,
            "class_names": list(data.classnames),
            "source": {"name": data.name, "path": data.path, "fell_back": fell_back},
            "box_convention": "[x0, y0, x1, y1] integer pixels, x right, y down, half-open: x0 <= x < x1",
            "splits": {split: {"count": counts[split], "shards": math.ceil(counts[split] / _SAMPLES_PER_SHARD)}
                       for split in GROUNDING_SPLITS},
        }
        (staging / "classes.json").write_text(json.dumps(description, indent=2) + "\n")
        if root.exists():
            root.rmdir()
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def grounding_description(root: str | Path) -> dict:
    """classes.json of a finished grounding directory: class names, source, parameters, split sizes."""
    path = Path(root).expanduser() / "classes.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path.parent} is not a grounding dataset (no classes.json); build it again") from None
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); delete {path.parent} and build again") from None


def split_shards(root: str | Path, split: str) -> str:
    """The brace pattern of one split's shards, as data.sources.N.shards takes it."""
    description = grounding_description(root)
    shards = description["splits"][split]["shards"]
    return str(Path(root).expanduser().resolve() / split / f"{{0..{shards - 1}}}.tar")


def load_grounding_split(root: str | Path, split: str) -> GroundingSplit:
    """Read one split of a built grounding directory into arrays, in key order."""
    if split not in GROUNDING_SPLITS:
        raise ConfigError(f"split must be one of {GROUNDING_SPLITS}, got {split!r}")
    description = grounding_description(root)
    split_dir = Path(root).expanduser() / split
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in sorted(split_dir.glob("*.tar")):
        try:
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    key, _, extension = member.name.partition(".")
                    members[key][extension] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as exc:
            raise InputError(f"cannot read grounding shard {shard}: {exc}") from None
    if not members:
        raise InputError(f"{split_dir} holds no grounding shards; build the dataset again")
    keys = sorted(members)
    images, masks, boxes, phrases, labels, captions = [], [], [], [], [], []
    for key in keys:
        fields = members[key]
        try:
            metadata = json.loads(fields["json"])
            images.append(np.asarray(Image.open(io.BytesIO(fields["png"]))))
            masks.append(np.asarray(Image.open(io.BytesIO(fields["seg.png"]))))
            captions.append(fields["txt"].decode("utf-8"))
        except KeyError as exc:
            raise InputError(f"grounding sample {key} in {split_dir} lacks its {exc.args[0]} file") from None
        boxes.append(np.asarray(metadata["boxes"], dtype=np.int64).reshape(-1, 4))
        phrases.append(list(metadata["phrases"]))
        labels.append(np.asarray(metadata["labels"], dtype=np.int64))
    return GroundingSplit(
        images=np.stack(images), segmentation=np.stack(masks), boxes=boxes, phrases=phrases, labels=labels,
        captions=captions, class_names=tuple(description["class_names"]), keys=keys,
    )


def compose_canvas(
    items: list[np.ndarray], labels: list[int], positions: list[tuple[int, int]], canvas_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw `items` (each (h, w) uint8) with their top-left corners at `positions` (x, y), in order.

    Returns (canvas (S, S) uint8, mask (S, S) uint8 class id + 1, boxes (K, 4) int64 tight around each item's
    non-zero pixels as placed, half-open).
    """
    canvas = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    mask = np.zeros_like(canvas)
    boxes = []
    for item, label, (x, y) in zip(items, labels, positions):
        height, width = item.shape
        drawn = item > 0
        canvas[y:y + height, x:x + width][drawn] = item[drawn]
        mask[y:y + height, x:x + width][drawn] = label + 1
        rows, columns = np.nonzero(drawn)
        boxes.append([x + columns.min(), y + rows.min(), x + columns.max() + 1, y + rows.max() + 1])
    return canvas, mask, np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


def canvas_caption(phrases: list[str]) -> str:
    """A caption naming every item, in drawing order (no left/right words, see contrastive.data.transforms)."""
    named = [f"a {phrase}" for phrase in phrases]
    listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
    return f"a picture of {listed}."


def _overlap_fraction(box: np.ndarray, other: np.ndarray) -> float:
    """Area of the intersection over the smaller box's area."""
    width = min(box[2], other[2]) - max(box[0], other[0])
    height = min(box[3], other[3]) - max(box[1], other[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
    return width * height / smaller


def _trimmed_item(image: np.ndarray, side: int) -> np.ndarray:
    """The source image resized to `side` and cropped to its non-zero pixels (at least one pixel stays)."""
    resized = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))
    rows, columns = np.nonzero(resized)
    if len(rows) == 0:
        return np.full((1, 1), 255, dtype=np.uint8)  # a blank source image still gets a visible, boxable pixel
    return resized[rows.min():rows.max() + 1, columns.min():columns.max() + 1]


def _sample_canvas(
    arrays: demo.SplitArrays, class_count: int, canvas_size: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[int], list[tuple[int, int]]]:
    item_count = int(rng.integers(MIN_ITEMS, MAX_ITEMS + 1))
    classes = rng.choice(class_count, size=item_count, replace=False)
    low, high = (max(4, round(fraction * canvas_size)) for fraction in ITEM_SIDE_FRACTIONS)
    items, labels, positions, placed = [], [], [], []
    for label in classes:
        candidates = np.flatnonzero(arrays.labels == label)
        if len(candidates) == 0:
            continue
        item = _trimmed_item(arrays.images[rng.choice(candidates)], int(rng.integers(low, high + 1)))
        height, width = item.shape
        for _ in range(_PLACEMENT_TRIES):
            x = int(rng.integers(0, canvas_size - width + 1))
            y = int(rng.integers(0, canvas_size - height + 1))
            box = np.array([x, y, x + width, y + height])
            if all(_overlap_fraction(box, other) <= MAX_OVERLAP_FRACTION for other in placed):
                break
        placed.append(box)
        items.append(item)
        labels.append(int(label))
        positions.append((x, y))
    return items, labels, positions


def _write_split(
    split_dir: Path, split: str, data: demo.SourceData, count: int, canvas_size: int, rng: np.random.Generator
) -> None:
    split_dir.mkdir()
    arrays = data.splits[split]
    with wds.ShardWriter(
        str(split_dir / "%d.tar"), maxcount=_SAMPLES_PER_SHARD, verbose=0, encoder=False, mtime=0
    ) as writer:
        for index in range(count):
            items, labels, positions = _sample_canvas(arrays, len(data.classnames), canvas_size, rng)
            canvas, mask, boxes = compose_canvas(items, labels, positions, canvas_size)
            phrases = [data.classnames[label] for label in labels]
            caption = canvas_caption(phrases)
            metadata = {
                "boxes": boxes.tolist(), "phrases": phrases, "labels": labels, "caption": caption,
                "width": canvas_size, "height": canvas_size, "source": data.name,
            }
            writer.write({
                "__key__": f"{split}_{index:08d}",
                "png": _png(canvas),
                "seg.png": _png(mask),
                "txt": caption.encode("utf-8"),
                "json": json.dumps(metadata).encode("utf-8"),
            })
    (split_dir / "nshards.txt").write_text(f"{math.ceil(count / _SAMPLES_PER_SHARD)}\n")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")  # (H, W) uint8: an 8-bit greyscale PNG, values kept exactly
    return buffer.getvalue()


def _check_existing(root: Path, parameters: dict) -> None:
    built_with = grounding_description(root).get("parameters", {})
    differences = [f"{name} {built_with.get(name)!r} (requested {value!r})"
                   for name, value in parameters.items() if built_with.get(name) != value]
    if differences:
        raise InputError(
            f"{root} already holds a grounding dataset built with different parameters: {'; '.join(differences)}. "
            "Delete it or choose another output directory."
        )
