"""open_clip models as LoadedEncoders: a directory as open_clip writes it (`open_clip_config.json` + weights, what
`contrastive-export --format open_clip` writes), or a config name plus a local weights file. Nothing is downloaded."""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import torch
from open_clip.model import get_model_preprocess_cfg
from torch import nn

from contrastive.data.transforms import Preprocess
from contrastive.encoders.encoder import LoadedEncoder, parameter_value
from contrastive.errors import ConfigError, InputError
from contrastive.models.towers import square_side
from contrastive.models.two_tower import OpenClipFeatures

CONFIG_FILE = "open_clip_config.json"


class OpenClipEncoder(OpenClipFeatures):
    """open_clip's CLIP / CustomTextCLIP / CoCa behind our interface: encode_image / encode_text normalised in fp32
    by default, `visual` for per-block features."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip


def open_clip_preprocess(clip: nn.Module) -> Preprocess:
    """The preprocessing open_clip records on the model (its image size, mean, std and interpolation)."""
    cfg = get_model_preprocess_cfg(clip)
    size = square_side(cfg.get("size", clip.visual.image_size), "the open_clip model's image size", InputError)
    return Preprocess(size, list(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                      list(cfg.get("std", open_clip.OPENAI_DATASET_STD)), cfg.get("interpolation", "bicubic"))


def _encoder(clip: nn.Module, model_name: str, name: str, source: str, device: torch.device) -> LoadedEncoder:
    try:
        tokenizer = open_clip.get_tokenizer(model_name)
    except OSError as error:
        raise InputError(f"the tokenizer of {name} is not available offline: {error}") from error
    scale = parameter_value(clip, "logit_scale")  # open_clip keeps its log
    return LoadedEncoder(
        model=OpenClipEncoder(clip).to(device).eval(),
        preprocess=open_clip_preprocess(clip),
        tokenizer=tokenizer,
        kind="open_clip",
        name=name,
        source=source,
        logit_scale=None if scale is None else math.exp(scale),
        logit_bias=parameter_value(clip, "logit_bias"),
    )


def load_open_clip_dir(path: Path, device: torch.device) -> LoadedEncoder:
    model_name = f"local-dir:{path}"
    try:
        clip = open_clip.create_model(model_name)
    except (RuntimeError, KeyError, FileNotFoundError, ValueError) as error:
        raise InputError(f"open_clip directory {path} does not load: {str(error).splitlines()[0]}") from error
    return _encoder(clip, model_name, path.name, str(path), device)


def load_open_clip_named(name: str, weights: Path, device: torch.device) -> LoadedEncoder:
    if name.startswith(("hf-hub:", "local-dir:")) or name not in open_clip.list_models():
        raise ConfigError(f"{name!r} is not an open_clip model config name (see open_clip.list_models())")
    if not weights.is_file():
        raise InputError(f"open_clip weights file {weights} does not exist (weights are never downloaded)")
    try:
        clip = open_clip.create_model(name, pretrained=str(weights))
    except (RuntimeError, KeyError) as error:
        raise InputError(f"weights {weights} do not fit open_clip model {name} (weights of another architecture, "
                         f"or a checkpoint of ours: pass that as --checkpoint): "
                         f"{str(error).splitlines()[0]}") from error
    return _encoder(clip, name, name, str(weights), device)
