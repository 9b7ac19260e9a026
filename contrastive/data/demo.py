"""The offline demo dataset: real images written as webdataset shards, built without a network.

Owns reading the sources (Fashion-MNIST idx files: a directory given, Debian's package, or the copy shipped in the
repository's demo_data/; scikit-learn's bundled digits as the last fallback), captioning
each image from a class-name template, and writing one directory that serves two readers at once:
the trainer reads img2dataset-style samples (``{key}.png``, ``.txt``, ``.json``) from ``train/``, and
clip_benchmark's ``wds`` loader reads ``test/`` (``.png`` + ``.cls``) with ``classnames.txt`` and
``zeroshot_classification_templates.txt``.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from contrastive.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

# Bump when the written layout or content changes, so an old directory is not mistaken for a current one.
BUILDER_VERSION = 1

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
# The same four files committed to the repository, for machines without network or apt (GPU nodes). Absent from an
# installed wheel, which then falls back as before.
REPO_FASHION_MNIST_DIR = Path(__file__).resolve().parents[2] / "demo_data" / "fashion-mnist"
FASHION_MNIST_SOURCE = "fashion-mnist"
DIGITS_SOURCE = "sklearn-digits"

FASHION_MNIST_CLASSNAMES = [
    "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
DIGITS_CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# `{c}` is clip_benchmark's class-name placeholder. Train and eval sets are disjoint so zero-shot
# evaluation does not simply replay the training captions.
TRAIN_TEMPLATES = [
    "a photo of a {c}.",
    "a black and white picture of a {c}.",
    "a small grayscale image of a {c}.",
    "a {c}.",
    "a product photo of a {c}.",
    "an image showing a {c}.",
    "a low resolution photo of a {c}.",
    "a picture of the {c}.",
]
EVAL_TEMPLATES = [
    "a photo of the {c}.",
    "a grayscale photo of a {c}.",
    "an image of a {c}.",
    "a blurry photo of a {c}.",
    "a close-up photo of the {c}.",
]

SPLITS = ("train", "test")
_IDX_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_IDX_UNSIGNED_BYTE = 0x08  # the only idx element type Fashion-MNIST uses
# Fixed tar member times keep shards byte-identical across rebuilds with the same seed. It must be an int:
# tarfile adds a 512-byte pax header to every member whose mtime is a float, doubling the shard size.
_SHARD_MTIME = 0


@dataclass(frozen=True)
class SplitArrays:
    """One split of a source, in source order."""

    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int64 class indices
    source_indices: np.ndarray  # (N,) int64 position of each sample in the source's own file or array


@dataclass(frozen=True)
class SourceData:
    """A labelled grayscale image source with a train and a test split."""

    name: str
    path: str | None
    classnames: tuple[str, ...]
    splits: dict[str, SplitArrays]


@dataclass(frozen=True)
class DemoDataset:
    """What a built demo directory holds; shard patterns are brace expansions ready for webdataset."""

    root: Path
    source: str  # FASHION_MNIST_SOURCE or DIGITS_SOURCE
    source_path: str | None  # the idx directory read, None for the digits
    fell_back: bool  # True when Fashion-MNIST was wanted by default but absent, so the digits were used
    train_shards: str  # e.g. ROOT/train/{0..11}.tar
    test_shards: str
    train_count: int
    test_count: int
    train_shard_count: int
    test_shard_count: int
    classnames: tuple[str, ...]


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an idx file (gzipped or not) holding unsigned bytes with `ndim` dimensions."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise InputError(f"idx file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"cannot read idx file {path}: {exc}") from None
    header_size = 4 + 4 * ndim
    expected_magic = bytes([0, 0, _IDX_UNSIGNED_BYTE, ndim])
    if len(raw) < header_size or raw[:4] != expected_magic:
        raise InputError(
            f"malformed idx file {path}: magic number {raw[:4].hex() or 'missing'}, "
            f"expected {expected_magic.hex()} (unsigned bytes, {ndim} dimensions)"
        )
    shape = tuple(int(size) for size in np.frombuffer(raw[4:header_size], dtype=">u4"))
    payload = raw[header_size:]
    if len(payload) != math.prod(shape):
        raise InputError(
            f"malformed idx file {path}: header declares shape {shape} ({math.prod(shape)} bytes) "
            f"but {len(payload)} bytes follow"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def find_idx_files(directory: str | Path) -> dict[tuple[str, str], Path]:
    """Locate the four Fashion-MNIST idx files in `directory`; raises ValueError naming any that is missing."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise InputError(f"source directory {directory} does not exist or is not a directory")
    found = {}
    for part, stem in _IDX_STEMS.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        existing = [candidate for candidate in candidates if candidate.is_file()]
        if not existing:
            raise InputError(f"source directory {directory} is missing {stem} (or {stem}.gz)")
        found[part] = existing[0]
    return found


def load_fashion_mnist(directory: str | Path) -> SourceData:
    """Read Fashion-MNIST (or any idx dataset with its ten classes) from a directory of idx files."""
    files = find_idx_files(directory)
    splits = {}
    for split in SPLITS:
        images = read_idx(files[split, "images"], ndim=3)
        labels = read_idx(files[split, "labels"], ndim=1).astype(np.int64)
        if len(labels) == 0:
            raise InputError(f"{files[split, 'labels']} holds no samples")
        if len(images) != len(labels):
            raise InputError(
                f"{files[split, 'images']} holds {len(images)} images but "
                f"{files[split, 'labels']} holds {len(labels)} labels"
            )
        if labels.max() >= len(FASHION_MNIST_CLASSNAMES):
            raise InputError(
                f"{files[split, 'labels']} has label {labels.max()}, expected 0..{len(FASHION_MNIST_CLASSNAMES) - 1}"
            )
        splits[split] = SplitArrays(images, labels, np.arange(len(labels), dtype=np.int64))
    path = str(Path(directory).expanduser().resolve())
    return SourceData(FASHION_MNIST_SOURCE, path, tuple(FASHION_MNIST_CLASSNAMES), splits)


def load_digits() -> SourceData:
    """scikit-learn's bundled 8x8 digits, scaled to 0..255, upsampled to 28x28, split 80/20 by class."""
    # Imported here: scikit-learn is slow to import and only the fallback needs it.
    from sklearn.datasets import load_digits as load_sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = load_sklearn_digits()
    small = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # digits values run 0..16
    images = np.stack(
        [np.asarray(Image.fromarray(image).resize((28, 28), Image.Resampling.BILINEAR)) for image in small]
    )
    labels = digits.target.astype(np.int64)
    train_indices, test_indices = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    splits = {}
    for split, indices in (("train", np.sort(train_indices)), ("test", np.sort(test_indices))):
        splits[split] = SplitArrays(images[indices], labels[indices], indices.astype(np.int64))
    return SourceData(DIGITS_SOURCE, None, tuple(DIGITS_CLASSNAMES), splits)


def build_demo_dataset(
    out_dir: str | Path,
    source: str | Path | None = None,
    samples_per_shard: int = 5000,
    seed: int = 0,
    limit: int | None = None,
    image_size: int | None = None,
) -> DemoDataset:
    """Write the demo shards to `out_dir`, or return the existing build made with the same parameters.

    `source` is a directory holding the four idx files, DIGITS_SOURCE, or None for the first of
    `default_fashion_mnist_dirs()` that holds them, with the digits as fallback. Test shards hold half as many
    samples as train shards.
    `limit` keeps the first N samples of each split. `image_size` upsamples every image to that square side
    (bicubic), for models whose patch grid needs more pixels than the source has (benchmarks/stages_quality.py).
    """
    if samples_per_shard < 2:
        raise ConfigError(f"samples_per_shard must be at least 2 (test shards hold half), got {samples_per_shard}")
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of samples per split, got {limit}")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image_size must be a positive number of pixels, got {image_size}")
    root = Path(out_dir).expanduser().resolve()
    source_name, source_path, fell_back = resolve_source(source)
    parameters = {
        "builder_version": BUILDER_VERSION,
        "source": source_name,
        "source_path": source_path,
        "samples_per_shard": samples_per_shard,
        "seed": seed,
        "limit": limit,
        "image_size": image_size,  # None (the source's size) in builds from before this parameter
    }
    if root.exists():
        if not root.is_dir():
            raise InputError(f"output path {root} exists and is not a directory")
        if any(root.iterdir()):
            return _reuse_existing(root, parameters)

    data = load_fashion_mnist(source_path) if source_name == FASHION_MNIST_SOURCE else load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename at the end, so an interrupted build never leaves a half-written root.
    staging = root.parent / f".{root.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # not tempfile.mkdtemp: its private 0700 mode would end up on the finished dataset
    try:
        info = _write_dataset(staging, data, parameters, fell_back)
        if root.exists():
            root.rmdir()  # an empty directory made ahead of time; rename cannot replace it portably
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("built demo dataset at %s from %s", root, source_name)
    return _describe(root, info)


def load_demo_dataset(root: str | Path) -> DemoDataset:
    """Describe a finished demo directory; raises ValueError if it is incomplete or not a demo dataset."""
    root = Path(root).expanduser().resolve()
    return _describe(root, _read_complete_info(root))


def _read_complete_info(root: Path) -> dict:
    """info.json of a demo directory, after checking that every file it promises is present."""
    info_path = root / "info.json"
    try:
        info = json.loads(info_path.read_text())
        shard_counts = {split: int(info["splits"][split]["shards"]) for split in SPLITS}
    except FileNotFoundError:
        raise InputError(
            f"{root} has no info.json: it is not a finished demo dataset; delete it and build again"
        ) from None
    except (KeyError, TypeError, ValueError) as exc:  # ValueError includes malformed JSON
        raise InputError(
            f"{info_path} is not a demo dataset description ({exc!r}); delete {root} and build again"
        ) from None
    expected_files = ["classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt"]
    for split, shards in shard_counts.items():
        expected_files.append(f"{split}/nshards.txt")
        expected_files.extend(f"{split}/{shard}.tar" for shard in range(shards))
    missing = [name for name in expected_files if not (root / name).is_file()]
    if missing:
        raise InputError(f"{root} is incomplete (missing {', '.join(missing[:3])}); delete it and build again")
    return info


def default_fashion_mnist_dirs() -> tuple[Path, ...]:
    """Where Fashion-MNIST is looked for when no source is given, in order: Debian's package, the repository's copy."""
    return DEFAULT_FASHION_MNIST_DIR, REPO_FASHION_MNIST_DIR


def resolve_source(source: str | Path | None) -> tuple[str, str | None, bool]:
    """Decide which source to read without loading it: (name, idx directory or None, fell_back)."""
    if source is None:
        reasons = []
        for directory in default_fashion_mnist_dirs():
            try:
                find_idx_files(directory)
            except ValueError as exc:
                reasons.append(str(exc))
                continue
            return FASHION_MNIST_SOURCE, str(directory.resolve()), False
        logger.warning(
            "Fashion-MNIST is not available (%s); FALLING BACK to scikit-learn's 8x8 digits upsampled to "
            "28x28. Install the Debian package dataset-fashion-mnist or pass a source directory.",
            "; ".join(reasons),
        )
        return DIGITS_SOURCE, None, True
    if str(source) == DIGITS_SOURCE:
        return DIGITS_SOURCE, None, False
    find_idx_files(source)
    return FASHION_MNIST_SOURCE, str(Path(source).expanduser().resolve()), False


def _reuse_existing(root: Path, parameters: dict) -> DemoDataset:
    info = _read_complete_info(root)
    built_with = info.get("parameters", {})
    differences = [
        f"{name} {built_with.get(name)!r} (requested {value!r})"
        for name, value in parameters.items()
        if built_with.get(name) != value
    ]
    if differences:
        raise InputError(
            f"{root} already holds a demo dataset built with different parameters: {'; '.join(differences)}. "
            "Delete it or choose another output directory."
        )
    logger.info("demo dataset at %s already built with the same parameters; reusing it", root)
    return _describe(root, info)


def _write_dataset(root: Path, data: SourceData, parameters: dict, fell_back: bool) -> dict:
    limit = parameters["limit"]
    shard_sizes = {"train": parameters["samples_per_shard"], "test": parameters["samples_per_shard"] // 2}
    templates = {"train": TRAIN_TEMPLATES, "test": EVAL_TEMPLATES}
    splits_info = {}
    for split_number, split in enumerate(SPLITS):
        arrays = data.splits[split]
        if limit is not None:
            arrays = SplitArrays(arrays.images[:limit], arrays.labels[:limit], arrays.source_indices[:limit])
        # One generator per split, so the test captions do not depend on how many train samples were drawn.
        rng = np.random.default_rng([parameters["seed"], split_number])
        count, shards = _write_split(
            root / split, split, arrays, data, templates[split], shard_sizes[split], rng, parameters["image_size"]
        )
        splits_info[split] = {
            "count": count,
            "shards": shards,
            "samples_per_shard": shard_sizes[split],
            "pattern": f"{split}/{{0..{shards - 1}}}.tar",
        }
    (root / "classnames.txt").write_text("".join(f"{name}\n" for name in data.classnames))
    (root / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in EVAL_TEMPLATES))
    (root / "dataset_type.txt").write_text("classification\n")
    info = {
        "builder_version": BUILDER_VERSION,
        "parameters": parameters,
        "source": {"name": data.name, "path": data.path, "fell_back": fell_back},
        "splits": splits_info,
        "classnames": list(data.classnames),
        "train_templates": TRAIN_TEMPLATES,
        "eval_templates": EVAL_TEMPLATES,
    }
    (root / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _write_split(
    split_dir: Path,
    split: str,
    arrays: SplitArrays,
    data: SourceData,
    templates: list[str],
    samples_per_shard: int,
    rng: np.random.Generator,
    image_size: int | None = None,
) -> tuple[int, int]:
    """Write one split's shards and nshards.txt; returns (samples written, shards written)."""
    split_dir.mkdir()
    template_choices = rng.integers(len(templates), size=len(arrays.labels))
    with wds.ShardWriter(
        str(split_dir / "%d.tar"),
        maxcount=samples_per_shard,
        verbose=0,
        post=lambda shard_path: logger.info("wrote %s", shard_path),
        encoder=False,  # every field below is already bytes, so the on-disk format is spelled out here
        mtime=_SHARD_MTIME,
    ) as writer:
        for image, label, source_index, template_choice in zip(
            arrays.images, arrays.labels, arrays.source_indices, template_choices
        ):
            if image_size is not None:
                image = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BICUBIC))
            key = f"{split}_{source_index:09d}"
            classname = data.classnames[label]
            caption = templates[template_choice].format(c=classname)
            metadata = {
                "key": key,
                "split": split,
                "index": int(source_index),
                "label": int(label),
                "classname": classname,
                "caption": caption,
                "width": image.shape[1],
                "height": image.shape[0],
                "source": data.name,
            }
            writer.write({
                "__key__": key,
                "png": _encode_png(image),
                "txt": caption.encode("utf-8"),
                "json": json.dumps(metadata).encode("utf-8"),
                "cls": str(int(label)).encode("ascii"),
            })
    count = len(arrays.labels)
    shards = math.ceil(count / samples_per_shard)
    (split_dir / "nshards.txt").write_text(f"{shards}\n")
    return count, shards


def _encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # (H, W) uint8 becomes an 8-bit grayscale PNG
    return buffer.getvalue()


def _describe(root: Path, info: dict) -> DemoDataset:
    splits = info["splits"]
    return DemoDataset(
        root=root,
        source=info["source"]["name"],
        source_path=info["source"]["path"],
        fell_back=info["source"]["fell_back"],
        train_shards=str(root / splits["train"]["pattern"]),
        test_shards=str(root / splits["test"]["pattern"]),
        train_count=splits["train"]["count"],
        test_count=splits["test"]["count"],
        train_shard_count=splits["train"]["shards"],
        test_shard_count=splits["test"]["shards"],
        classnames=tuple(info["classnames"]),
    )
