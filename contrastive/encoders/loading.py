"""`load_encoder`: which format a path holds, told from its files, and the loader for it."""

from __future__ import annotations

from pathlib import Path

import torch

from contrastive.checkpoint_io import TRAINER_STATE_FILE, checkpoint_dir
from contrastive.encoders import open_clip_models, transformers_models
from contrastive.encoders.encoder import LoadedEncoder
from contrastive.encoders.ours import load_checkpoint_encoder
from contrastive.errors import InputError

# Our own image-only bundle is read by the export layer, which owns its format.
BUNDLE_FILE = "encoder.json"


def detect_kind(path: Path) -> str:
    """"contrastive" (a checkpoint file, a sharded checkpoint directory or a run directory), "open_clip" or
    "transformers"; ValueError otherwise."""
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_file() or checkpoint_dir(path).is_dir() or (path / TRAINER_STATE_FILE).is_file():
        return "contrastive"
    if (path / open_clip_models.CONFIG_FILE).is_file():
        return "open_clip"
    if (path / transformers_models.CONFIG_FILE).is_file():
        return "transformers"
    hint = ("; it is an image-only encoder bundle: use contrastive.export.load_vision_encoder"
            if (path / BUNDLE_FILE).is_file() else "")
    raise InputError(f"{path} is not a model directory this can read: it has no checkpoints/ (a run of ours), "
                     f"{open_clip_models.CONFIG_FILE} (open_clip) or {transformers_models.CONFIG_FILE} "
                     f"(transformers){hint}")


def load_encoder(path: str | Path, open_clip_name: str | None = None,
                 device: str | torch.device = "cpu", weights: str = "model") -> LoadedEncoder:
    """The encoder at `path`, in eval mode on `device`. With `open_clip_name`, `path` is a local weights file for
    that open_clip model config. `weights="ema"` takes a checkpoint's of ours EMA weights instead of its trained
    ones. Errors are one-line ValueErrors naming the path and what is wrong."""
    path, device = Path(path), torch.device(device)
    if open_clip_name is not None:
        return open_clip_models.load_open_clip_named(open_clip_name, path, device)
    kind = detect_kind(path)
    if weights != "model" and kind != "contrastive":
        raise InputError(f"--weights {weights} needs a checkpoint of ours; {path} holds a {kind} model")
    if kind == "contrastive":
        return load_checkpoint_encoder(path, device, weights)
    if kind == "open_clip":
        return open_clip_models.load_open_clip_dir(path, device)
    return transformers_models.load_transformers_dir(path, device)
