"""The reinforced data set format (MobileCLIP's "reinforced" data sets): img2dataset shards whose samples also carry
their teachers' embeddings and the augmentations they were computed on (`contrastive-data reinforce` writes them,
the training stream reads them with loss.distillation.reinforced=true).

Per sample, beside the original files, one member `KEY.distill.npy`: a 0-d structured array (one tar member, one
cached header parse and one view of the bytes per sample: three members per sample read a third slower) with
- `source_size`: (2,) int32, the image's (height, width) as stored, before any JPEG draft decoding
- `boxes`: (K, 4) int32, each augmentation's crop (top, left, height, width) in the stored image's pixels; a reader
  that decodes a JPEG at a reduced scale scales them to the decoded size (transforms.scale_crop)
- `flips`: (K,) bool
- `<teacher>.image`: (K, D) the teacher's L2-normalised image embedding of each augmentation
- `<teacher>.text`: (D,) its text embedding of the caption, where the teacher has a text tower
- `<teacher>.logit_scale`, `<teacher>.logit_bias`: float64 scalars, where the teacher has them
embeddings stored as float16 by default (float32 on request). Sets written before this format (a `distill.json`
and per-teacher `.img.npy` / `.txt.npy` members, boxes in full-resolution pixels) are refused in one line.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contrastive.data.remote import protocol_of
from contrastive.data.transforms import BadSample, CropParams
from contrastive.errors import ConfigError, InputError

RECORD = "distill.npy"
MANIFEST = "reinforce.json"  # beside the shards, written last: the teachers (source, sha256 of weights), the options
OLD_FORMAT_MEMBER = "distill.json"  # the metadata member of the format before RECORD
TEACHER_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a teacher's name is part of its record's field names
DTYPES = {"float16": np.float16, "float32": np.float32}
log = logging.getLogger(__name__)


def to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of an .npy header. Parsing one (numpy evaluates it as a Python literal) costs
    more than the rest of a reinforced sample's reading, and a data set's headers repeat: one per teacher set and K."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def from_npy(data: bytes) -> np.ndarray:
    """An .npy file's array (read-only, a view of `data`); ValueError where the bytes are no .npy of plain values."""
    # magic (6 bytes), version (2), header length (2 bytes in version 1, 4 from version 2), header
    length_bytes = 2 if data[6:7] == b"\x01" else 4
    header_end = 8 + length_bytes + int.from_bytes(data[8:8 + length_bytes], "little")
    shape, fortran_order, dtype = _npy_header(bytes(data[:header_end]))
    if fortran_order or dtype.hasobject:
        raise ValueError("a stored embedding must be a C-ordered array of numbers")
    return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header_end).reshape(shape)


@dataclass
class StoredTargets:
    """One sample's reinforcement: its augmentations and, per teacher, their embeddings."""

    source_size: tuple[int, int]  # (height, width) of the stored image, the pixels the boxes are in
    boxes: np.ndarray  # (K, 4) int: top, left, height, width
    flips: np.ndarray  # (K,) bool
    image_embeddings: dict[str, np.ndarray]  # teacher -> (K, D)
    text_embeddings: dict[str, np.ndarray | None]  # teacher -> (D,) or None
    logit_scales: dict[str, float | None]
    logit_biases: dict[str, float | None]

    @classmethod
    def of(cls, source_size: tuple[int, int], augmentations: list[CropParams], **rest) -> StoredTargets:
        boxes = np.asarray([[p.top, p.left, p.height, p.width] for p in augmentations], dtype=np.int32)
        return cls(source_size, boxes.reshape(len(augmentations), 4),
                   np.asarray([p.flip for p in augmentations], dtype=bool), **rest)

    def augmentation(self, index: int) -> CropParams:
        """The index-th stored augmentation (built on demand: training replays one per sample)."""
        return CropParams(*self.boxes[index].tolist(), flip=bool(self.flips[index]))


def encode_sample_files(targets: StoredTargets, dtype: str = "float16") -> dict[str, bytes]:
    """The member a reinforced sample adds, extension -> bytes."""
    values = {"source_size": np.asarray(targets.source_size, dtype=np.int32),
              "boxes": targets.boxes.astype(np.int32), "flips": targets.flips.astype(bool)}
    for name, embeddings in targets.image_embeddings.items():
        values[f"{name}.image"] = embeddings.astype(DTYPES[dtype])
        if targets.text_embeddings.get(name) is not None:
            values[f"{name}.text"] = targets.text_embeddings[name].astype(DTYPES[dtype])
        for field, scalars in (("logit_scale", targets.logit_scales), ("logit_bias", targets.logit_biases)):
            if scalars.get(name) is not None:
                values[f"{name}.{field}"] = np.float64(scalars[name])
    record = np.zeros((), dtype=[(field, value.dtype, value.shape) for field, value in values.items()])
    for field, value in values.items():
        record[field] = value
    return {RECORD: to_npy(record)}


def read_sample_files(raw: dict, teachers: tuple[str, ...]) -> StoredTargets:
    """A raw sample's reinforcement for `teachers`; BadSample("missing_teacher_embeddings") where any is absent,
    InputError where the sample is in the format before RECORD."""
    if RECORD not in raw:
        if OLD_FORMAT_MEMBER in raw:
            raise InputError(f"{raw.get('__url__')}: written by an older contrastive-data reinforce (a "
                             f"{OLD_FORMAT_MEMBER} per sample, crop boxes in full-resolution pixels); write the set "
                             f"again with contrastive-data reinforce")
        raise BadSample("missing_teacher_embeddings", f"needs {RECORD}: write it with contrastive-data reinforce")
    try:
        record = from_npy(raw[RECORD])
        fields = record.dtype.names or ()
        missing = [name for name in teachers if f"{name}.image" not in fields]
        if missing:
            raise KeyError(f"no embeddings of {', '.join(missing)}")
        height, width = record["source_size"].tolist()
        boxes, flips = record["boxes"], record["flips"]
        images = {name: record[f"{name}.image"] for name in teachers}
        texts = {name: record[f"{name}.text"] if f"{name}.text" in fields else None for name in teachers}
        scalars = {field: {name: float(record[f"{name}.{field}"]) if f"{name}.{field}" in fields else None
                           for name in teachers} for field in ("logit_scale", "logit_bias")}
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise BadSample("missing_teacher_embeddings", f"unreadable reinforcement: {error}") from error
    if len(flips) != len(boxes) or any(len(embeddings) != len(boxes) for embeddings in images.values()):
        raise BadSample("missing_teacher_embeddings", "embedding count differs from the augmentation count")
    return StoredTargets((height, width), boxes, flips, images, texts, scalars["logit_scale"], scalars["logit_bias"])


def normalized_rows(embeddings: Sequence[np.ndarray]) -> torch.Tensor:
    """Stored embeddings (fp16 rounding moves them off the unit sphere), (D,) each -> fp32 unit rows (N, D), in one
    tensor operation per batch."""
    return torch.nn.functional.normalize(torch.from_numpy(np.stack(embeddings).astype(np.float32)), dim=-1, eps=1e-12)


def check_set_teachers(urls: list[str], source_name: str, teacher_hashes: dict[str, str]) -> None:
    """Refuse, before training, a reinforced source whose shards were not written by the configured teachers: each
    shard directory's MANIFEST must name every teacher of loss.distillation.teachers with the same weights hash
    (contrastive.encoders.weights_hash). Stored embeddings of other weights would be distilled silently otherwise.
    Shards in an object store are not checked (logged)."""
    directories = sorted({str(Path(url).parent) for url in urls if protocol_of(url) is None})
    if any(protocol_of(url) is not None for url in urls):
        log.warning("data source %r: the teachers of its shards in an object store are not checked against "
                    "loss.distillation.teachers (their %s is not read)", source_name, MANIFEST)
    for directory in directories:
        path = Path(directory) / MANIFEST
        try:
            written = json.loads(path.read_text())["teachers"]
        except FileNotFoundError:
            raise ConfigError(f"data source {source_name!r}: no {path}; contrastive-data reinforce writes it once "
                              f"every shard is done (run it again to finish the set)") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"data source {source_name!r}: unreadable {path}: {error}") from None
        for name, digest in teacher_hashes.items():
            entry = written.get(name)
            stored = entry.get("sha256") if isinstance(entry, dict) else None
            if stored != digest:
                raise ConfigError(
                    f"data source {source_name!r}: {path} was written with teacher {name!r} "
                    f"{'absent' if stored is None else f'sha256 {stored[:12]}'}, and loss.distillation.teachers has "
                    f"{name!r} with sha256 {digest[:12]}: reinforce the set with this teacher or configure the "
                    f"teacher it was written with")
