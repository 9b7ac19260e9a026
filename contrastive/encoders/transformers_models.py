"""transformers models as LoadedEncoders: a directory with `config.json` and `preprocessor_config.json`, as
`contrastive-export --format transformers` writes it (CLIPVisionModel[WithProjection], SiglipVisionModel) or as
transformers saves a whole CLIPModel / SiglipModel (its tokenizer files included, for the text tower)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from contrastive.data.transforms import Preprocess
from contrastive.encoders.encoder import LoadedEncoder, parameter_value
from contrastive.errors import InputError

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Image-only classes -> the output field that is the image embedding.
IMAGE_MODELS = {"CLIPVisionModelWithProjection": "image_embeds", "CLIPVisionModel": "pooler_output",
                "SiglipVisionModel": "pooler_output"}
DUAL_MODELS = ("CLIPModel", "SiglipModel")
# PIL resampling codes, as transformers' image processors store them.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class TransformersImageEncoder(nn.Module):
    def __init__(self, hf_model: nn.Module, output: str) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.output = output

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = getattr(self.hf_model(pixel_values=images), self.output)  # (B, D)
        return F.normalize(features.float(), dim=-1) if normalize else features


class TransformersDualEncoder(nn.Module):
    """CLIPModel / SiglipModel: get_*_features give the projected embeddings as `pooler_output` (transformers 5)."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.hf_model.get_image_features(pixel_values=images).pooler_output  # (B, D)
        return F.normalize(features.float(), dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.hf_model.get_text_features(input_ids=tokens).pooler_output  # (B, D)
        return F.normalize(features.float(), dim=-1) if normalize else features


class PaddedTokenizer:
    """texts -> (N, context_length) int64 ids, padded to the full length: SigLIP was trained on padded text, and
    CLIP's causal text tower never looks past the end token."""

    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt")["input_ids"]


def transformers_preprocess(path: Path) -> Preprocess:
    """From the image processor's config: resize + centre crop to one square size, then normalise."""
    file = path / PREPROCESSOR_FILE
    if not file.is_file():
        raise InputError(f"transformers directory {path} has no {PREPROCESSOR_FILE}: its preprocessing is unknown")
    cfg = json.loads(file.read_text())
    size = cfg.get("crop_size") if cfg.get("do_center_crop") else cfg.get("size")
    height, width = (size, size) if isinstance(size, int) else (size.get("height"), size.get("width"))
    if height is None or height != width:
        raise InputError(f"{file}: {'crop_size' if cfg.get('do_center_crop') else 'size'}={size} is not one "
                         f"square size")
    resample = cfg.get("resample", 3)
    if resample not in _RESAMPLE:
        raise InputError(f"{file}: resample={resample} is not nearest (0), bilinear (2) or bicubic (3)")
    return Preprocess(int(height), list(cfg["image_mean"]), list(cfg["image_std"]), _RESAMPLE[resample])


def _text_tokenizer(transformers, path: Path, hf_model: nn.Module) -> PaddedTokenizer | None:
    """The saved tokenizer, or None when the directory holds none (the text tower is then unusable).

    Its files are looked for first: without them AutoTokenizer may still build an empty tokenizer from the model
    config, which would turn every text into unknown tokens.
    """
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise InputError(f"the tokenizer saved in {path} does not load: {str(error).splitlines()[0]}") from error
    return PaddedTokenizer(tokenizer, hf_model.config.text_config.max_position_embeddings)


def load_transformers_dir(path: Path, device: torch.device) -> LoadedEncoder:
    try:
        import transformers
    except ImportError as error:
        raise InputError(f"{path} is a transformers directory; reading it needs the transformers package") from error
    architectures = json.loads((path / CONFIG_FILE).read_text()).get("architectures") or [None]
    architecture = architectures[0]
    if architecture not in IMAGE_MODELS and architecture not in DUAL_MODELS:
        raise InputError(f"{path / CONFIG_FILE} names architecture {architecture}; readable are "
                         f"{', '.join([*IMAGE_MODELS, *DUAL_MODELS])}")
    preprocess = transformers_preprocess(path)
    hf_model = getattr(transformers, architecture).from_pretrained(path).eval()
    tokenizer = None
    if architecture in DUAL_MODELS:
        model, tokenizer = TransformersDualEncoder(hf_model), _text_tokenizer(transformers, path, hf_model)
    else:
        model = TransformersImageEncoder(hf_model, IMAGE_MODELS[architecture])
    scale = parameter_value(hf_model, "logit_scale")  # stored as its log, as in open_clip
    return LoadedEncoder(
        model=model.to(device).eval(),
        preprocess=preprocess,
        tokenizer=tokenizer,
        kind="transformers",
        name=path.name,
        source=str(path),
        logit_scale=None if scale is None else math.exp(scale),
        logit_bias=parameter_value(hf_model, "logit_bias"),
    )
