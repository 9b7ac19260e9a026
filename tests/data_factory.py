"""Small webdataset shards made on the spot for data tests, including every kind of bad sample."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def png(size: tuple[int, int] = (28, 28), mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    if mode == "F":  # float pixels: PNG cannot hold them, TIFF can (the stream sniffs the format, not the name)
        Image.new(mode, size, 0.5).save(buffer, format="TIFF")
    else:
        Image.new(mode, size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for key, files in samples:
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def good_samples(prefix: str, count: int) -> list[tuple[str, dict[str, bytes]]]:
    image = png()
    return [(f"{prefix}{i:04d}", {"png": image, "txt": f"a photo of item {i}.".encode()}) for i in range(count)]


# Reason each bad sample is counted under, by key.
BAD_SAMPLES = {
    "corrupt": ("corrupt_image", {"png": b"\x89PNG not really", "txt": b"a caption"}),
    "floatpixels": ("wrong_image_mode", {"png": png(mode="F"), "txt": b"a caption"}),
    "tiny": ("wrong_image_size", {"png": png((4, 4)), "txt": b"a caption"}),
    "nocaption": ("missing_caption", {"png": png()}),
    "emptycaption": ("empty_caption", {"png": png(), "txt": b"   "}),
    "noimage": ("missing_image", {"txt": b"a caption"}),
}


def bad_shard_set(root: Path, good_per_shard: int = 16) -> tuple[list[str], dict[str, int], int]:
    """Four shards: bad samples among good ones, a clean one, a truncated copy, and a missing one.

    Returns (shard paths, expected skip counts by reason, good samples per full pass)."""
    root.mkdir(parents=True, exist_ok=True)
    bad = [(key, files) for key, (_, files) in BAD_SAMPLES.items()]
    write_tar(root / "0.tar", good_samples("a", good_per_shard)[:8] + bad + good_samples("a", good_per_shard)[8:])
    write_tar(root / "1.tar", good_samples("b", good_per_shard))
    whole = write_tar(root / "full2.tar", good_samples("c", good_per_shard)).read_bytes()
    (root / "full2.tar").unlink()
    cut = len(whole) // 2
    (root / "2.tar").write_bytes(whole[:cut])
    with tarfile.open(fileobj=io.BytesIO(whole[:cut]), mode="r|") as archive:
        names = []
        try:
            names = [member.name for member in archive]
        except tarfile.TarError:
            pass
    readable = len({name.split(".")[0] for name in names}) - 1  # the sample cut in half is dropped
    expected = {reason: 1 for reason, _ in BAD_SAMPLES.values()} | {"truncated_shard": 1, "unreadable_shard": 1}
    shards = [str(root / f"{i}.tar") for i in range(3)] + [str(root / "missing.tar")]
    return shards, expected, 2 * good_per_shard + readable
