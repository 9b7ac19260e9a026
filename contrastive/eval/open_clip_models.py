"""open_clip models as evaluation subjects: a model name plus a local weights file (nothing is downloaded).

The wrapper gives them the interface of our models (`cfg` for preprocessing, normalised encode_image /
encode_text, `visual`), so every evaluator and the linear probe take either.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import get_model_preprocess_cfg
from torch import nn

from contrastive.config import ModelConfig
from contrastive.errors import InputError


class OpenClipEvalModel(nn.Module):
    def __init__(self, clip: nn.Module, name: str) -> None:
        super().__init__()
        self.clip = clip
        preprocess = get_model_preprocess_cfg(clip)
        size = preprocess.get("size", clip.visual.image_size)
        self.cfg = ModelConfig(
            open_clip_name=name,
            vision={"image_size": size if isinstance(size, int) else list(size)},
            image_mean=list(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            image_std=list(preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
            interpolation=preprocess.get("interpolation", "bicubic"),
        )

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.clip.encode_image(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.clip.encode_text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()


def load_open_clip_model(name: str, weights: str | Path) -> tuple[OpenClipEvalModel, object, dict]:
    """(model in eval mode, tokenizer, description) for an open_clip config name and a local weights file."""
    if name.startswith(("hf-hub:", "local-dir:")) or name not in open_clip.list_models():
        raise InputError(f"{name!r} is not an open_clip model config name (see open_clip.list_models())")
    if not Path(weights).is_file():
        raise InputError(f"open_clip weights file {weights} does not exist (weights are never downloaded)")
    try:
        clip = open_clip.create_model(name, pretrained=str(weights))
    except (RuntimeError, KeyError) as error:
        raise InputError(f"weights {weights} do not fit open_clip model {name} (weights of another architecture, "
                         f"or a checkpoint of ours: pass that as --checkpoint): {str(error).splitlines()[0]}") from error
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except OSError as error:
        raise InputError(f"the tokenizer of {name} is not available offline: {error}") from error
    return OpenClipEvalModel(clip, name).eval(), tokenizer, {"name": name, "checkpoint": str(weights)}
