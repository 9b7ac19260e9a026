"""The reinforced data set format (MobileCLIP's "reinforced" data sets): img2dataset shards whose samples also carry
their teachers' embeddings and the augmentations they were computed on (`contrastive-data reinforce` writes them,
the training stream reads them with loss.distillation.reinforced=true).

Per sample, beside the original files:
- `KEY.distill.json`: {"augmentations": [{"top", "left", "height", "width", "flip"}, ...] (in the decoded image's
  pixels), "teachers": {name: {"logit_scale": float | null, "logit_bias": float | null}}}
- `KEY.<teacher>.img.npy`: (K, D) the teacher's L2-normalised image embedding of each of the K augmentations
- `KEY.<teacher>.txt.npy`: (D,) its text embedding of the caption, where the teacher has a text tower
stored as float16 by default (float32 on request).
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from contrastive.data.transforms import BadSample, CropParams

METADATA = "distill.json"
TEACHER_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a teacher's name is part of its files' extensions
FULL_RESOLUTION = 1 << 16  # a decode size that keeps JPEGs at full size: crop boxes are stored in those pixels
DTYPES = {"float16": np.float16, "float32": np.float32}


def image_extension(teacher: str) -> str:
    return f"{teacher}.img.npy"


def text_extension(teacher: str) -> str:
    return f"{teacher}.txt.npy"


def to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of an .npy header. Parsing one (numpy evaluates it as a Python literal) costs
    more than the rest of a reinforced sample's reading, and a data set's headers repeat: one shape per teacher."""
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

    augmentations: list[CropParams]
    image_embeddings: dict[str, np.ndarray]  # teacher -> (K, D)
    text_embeddings: dict[str, np.ndarray | None]  # teacher -> (D,) or None
    logit_scales: dict[str, float | None]
    logit_biases: dict[str, float | None]


def encode_sample_files(targets: StoredTargets, dtype: str = "float16") -> dict[str, bytes]:
    """The files a reinforced sample adds, extension -> bytes."""
    metadata = {"augmentations": [params.to_dict() for params in targets.augmentations],
                "teachers": {name: {"logit_scale": targets.logit_scales[name], "logit_bias": targets.logit_biases[name]}
                             for name in targets.image_embeddings}}
    files = {METADATA: json.dumps(metadata).encode()}
    for name, embeddings in targets.image_embeddings.items():
        files[image_extension(name)] = to_npy(embeddings.astype(DTYPES[dtype]))
        if targets.text_embeddings.get(name) is not None:
            files[text_extension(name)] = to_npy(targets.text_embeddings[name].astype(DTYPES[dtype]))
    return files


def read_sample_files(raw: dict, teachers: tuple[str, ...]) -> StoredTargets:
    """A raw sample's reinforcement for `teachers`; BadSample("missing_teacher_embeddings") where any is absent."""
    if METADATA not in raw or any(image_extension(name) not in raw for name in teachers):
        raise BadSample("missing_teacher_embeddings", f"needs {METADATA} and the embeddings of {', '.join(teachers)}: "
                        "write them with contrastive-data reinforce")
    try:
        metadata = json.loads(raw[METADATA])
        augmentations = [CropParams(**params) for params in metadata["augmentations"]]
        images = {name: from_npy(raw[image_extension(name)]) for name in teachers}
        texts = {name: from_npy(raw[text_extension(name)]) if text_extension(name) in raw else None
                 for name in teachers}
        teacher_info = {name: metadata["teachers"][name] for name in teachers}
    except (ValueError, KeyError, TypeError) as error:
        raise BadSample("missing_teacher_embeddings", f"unreadable reinforcement: {error}") from error
    if any(len(embeddings) != len(augmentations) for embeddings in images.values()):
        raise BadSample("missing_teacher_embeddings", "embedding count differs from the augmentation count")
    return StoredTargets(augmentations, images, texts, {n: i["logit_scale"] for n, i in teacher_info.items()},
                         {n: i["logit_bias"] for n, i in teacher_info.items()})


def normalized_rows(embeddings: Sequence[np.ndarray]) -> torch.Tensor:
    """Stored embeddings (fp16 rounding moves them off the unit sphere), (D,) each -> fp32 unit rows (N, D), in one
    tensor operation per batch."""
    return torch.nn.functional.normalize(torch.from_numpy(np.stack(embeddings).astype(np.float32)), dim=-1, eps=1e-12)
