"""transformers models as LoadedEncoders: a directory with `config.json` and `preprocessor_config.json`, as
`contrastive-export --format transformers` writes it (CLIPVisionModel[WithProjection], SiglipVisionModel,
Siglip2VisionModel for NaFlex towers) or as transformers saves a whole CLIPModel / SiglipModel (its tokenizer files
included, for the text tower)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from contrastive.data.naflex import patchify
from contrastive.data.transforms import Preprocess
from contrastive.encoders.encoder import LoadedEncoder, parameter_value
from contrastive.encoders.naflex import NaFlexEncoderOutput
from contrastive.errors import ConfigError, InputError

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Image-only classes -> the output field that is the image embedding.
IMAGE_MODELS = {"CLIPVisionModelWithProjection": "image_embeds", "CLIPVisionModel": "pooler_output",
                "SiglipVisionModel": "pooler_output"}
DUAL_MODELS = ("CLIPModel", "SiglipModel")
NAFLEX_MODEL = "Siglip2VisionModel"
DEFAULT_FEATURE_LAYER = -2  # the penultimate block, as export.bundle's default (LLaVA's choice)
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


class Siglip2ImageEncoder(nn.Module):
    """Siglip2VisionModel on our NaFlex patch sequences (contrastive.data.naflex: patches (B, N, P*P*3) with
    coordinates (B, N, 2) and a valid mask (B, N), the layout Siglip2ImageProcessor gives), or on (B, 3, H, W)
    images of any multiple of the patch size, each then one whole grid, as our NaFlex towers take them."""

    def __init__(self, hf_model: nn.Module, patch_size: int) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.patch_size = patch_size

    def _run(self, images: torch.Tensor, patch_coord: torch.Tensor | None, patch_valid: torch.Tensor | None,
             hidden_states: bool = False):
        if patch_coord is None:  # whole images: every patch is valid
            rows, columns = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
            images = torch.stack([patchify(image, self.patch_size) for image in images])
            grids = torch.tensor([[rows, columns]] * len(images), device=images.device)
            patch_valid = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
        else:
            grids = patch_coord.amax(dim=1) + 1  # (B, 2) rows, columns: padding sits at (0, 0)
        return self.hf_model(pixel_values=images, pixel_attention_mask=patch_valid, spatial_shapes=grids,
                             output_hidden_states=hidden_states), grids, patch_valid

    def encode_image(self, images: torch.Tensor, normalize: bool = True, patch_coord: torch.Tensor | None = None,
                     patch_valid: torch.Tensor | None = None) -> torch.Tensor:
        features = self._run(images, patch_coord, patch_valid)[0].pooler_output  # (B, D)
        return F.normalize(features.float(), dim=-1) if normalize else features

    def forward_naflex(self, patches: torch.Tensor, patch_coord: torch.Tensor, patch_valid: torch.Tensor,
                       feature_layer: int = DEFAULT_FEATURE_LAYER) -> NaFlexEncoderOutput:
        """Each image's valid patch tokens of block `feature_layer` (negative counts from the last) in its own
        grid (rows, columns, D), and the pooled embedding: export.bundle.VisionEncoder.forward_naflex's output."""
        layers = self.hf_model.config.num_hidden_layers
        if not -layers <= feature_layer <= -1:
            raise ConfigError(f"feature_layer={feature_layer} is outside -{layers}..-1")
        out, grids, valid = self._run(patches, patch_coord, patch_valid, hidden_states=True)
        tokens = [layer[mask].reshape(rows, columns, -1) for layer, mask, (rows, columns)
                  in zip(out.hidden_states[feature_layer], valid, grids.tolist())]
        return NaFlexEncoderOutput(patch_tokens=tokens, pooled=out.pooler_output)


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


def siglip2_preprocess(path: Path, hf_config) -> Preprocess:
    """From Siglip2ImageProcessor's config: the patch side, the normalisation and resize kernel; the fixed size is
    the position table's own square grid (what the tower takes without --seq-len)."""
    cfg = json.loads((path / PREPROCESSOR_FILE).read_text())
    resample = cfg.get("resample", 2)
    if resample not in _RESAMPLE or cfg.get("patch_size") != hf_config.patch_size:
        raise InputError(f"{path / PREPROCESSOR_FILE}: resample={resample} must be nearest (0), bilinear (2) or "
                         f"bicubic (3) and patch_size={cfg.get('patch_size')} the model's {hf_config.patch_size}")
    side = math.isqrt(hf_config.num_patches)
    return Preprocess(side * hf_config.patch_size, list(cfg["image_mean"]), list(cfg["image_std"]),
                      _RESAMPLE[resample], patch_size=hf_config.patch_size)


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
    if architecture not in IMAGE_MODELS and architecture not in DUAL_MODELS and architecture != NAFLEX_MODEL:
        raise InputError(f"{path / CONFIG_FILE} names architecture {architecture}; readable are "
                         f"{', '.join([*IMAGE_MODELS, *DUAL_MODELS, NAFLEX_MODEL])}")
    if not (path / PREPROCESSOR_FILE).is_file():
        raise InputError(f"transformers directory {path} has no {PREPROCESSOR_FILE}: its preprocessing is unknown")
    hf_model = getattr(transformers, architecture).from_pretrained(path, local_files_only=True).eval()
    tokenizer = None
    if architecture == NAFLEX_MODEL:
        preprocess = siglip2_preprocess(path, hf_model.config)
        model = Siglip2ImageEncoder(hf_model, hf_model.config.patch_size)
    else:
        preprocess = transformers_preprocess(path)
    if architecture in DUAL_MODELS:
        model, tokenizer = TransformersDualEncoder(hf_model), _text_tokenizer(transformers, path, hf_model)
    elif architecture in IMAGE_MODELS:
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
