"""Encoder bundle, our own format: `vision.safetensors` (the image tower's state dict) + `encoder.json`.

`load_vision_encoder(dir)` rebuilds the tower from the recorded model config and returns a `VisionEncoder`:
patch tokens from a chosen layer for a VLM connector, the pooled embedding, and the preprocessing it expects.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from contrastive.config import ModelConfig
from contrastive.data.transforms import Preprocess
from contrastive.encoders import preprocess_from_config
from contrastive.encoders.naflex import NaFlexEncoderOutput
from contrastive.errors import ConfigError
from contrastive.export.base import EXPORT_FORMATS, Exported
from contrastive.models.naflex import is_naflex_tower

CONFIG_FILE = "encoder.json"
WEIGHTS_FILE = "vision.safetensors"
BUNDLE_VERSION = 1
DEFAULT_FEATURE_LAYER = -2  # the penultimate block, LLaVA's mm_vision_select_layer (the last one for 1-block towers)


@dataclass
class VisionEncoderOutput:
    patch_tokens: torch.Tensor  # (B, N, D): spatial tokens of the chosen layer, class token dropped
    pooled: torch.Tensor  # (B, E): the tower's image embedding (unnormalised), as the contrastive head saw it


def tower_depth(visual: nn.Module) -> int:
    if hasattr(visual, "transformer"):
        return len(visual.transformer.resblocks)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks"):
        return len(trunk.blocks)
    raise ConfigError(f"the {type(visual).__name__} image tower is not a ViT; patch tokens need a transformer tower")


def block_index(feature_layer: int, depth: int) -> int:
    """Hidden-state index as transformers and LLaVA count (0 = embeddings, k = output of block k, -1 = last)
    -> 0-based block index. The embeddings themselves are not offered: they carry no image context."""
    if not (1 <= feature_layer <= depth or -depth <= feature_layer <= -1):
        raise ConfigError(f"feature_layer={feature_layer} is outside 1..{depth} and -{depth}..-1 "
                          f"for a {depth}-block tower")
    return feature_layer - 1 if feature_layer > 0 else depth + feature_layer


class VisionEncoder(nn.Module):
    """images (B, 3, S, S), preprocessed as `preprocess` says -> VisionEncoderOutput.

    `hidden_size` is D of the patch tokens (the connector's input width); `num_patches` is N.
    """

    def __init__(self, visual: nn.Module, preprocess: Preprocess, feature_layer: int | None = None) -> None:
        super().__init__()
        self.visual = visual
        self.preprocess = preprocess
        self.depth = tower_depth(visual)
        if feature_layer is None:
            feature_layer = DEFAULT_FEATURE_LAYER if self.depth > 1 else -1
        self.feature_layer = feature_layer
        self.block = block_index(feature_layer, self.depth)
        with torch.no_grad():
            probe = self.visual.forward_intermediates(
                torch.zeros(1, 3, preprocess.image_size, preprocess.image_size), indices=[self.block],
                output_fmt="NLC", intermediates_only=True)["image_intermediates"][0]
        self.num_patches, self.hidden_size = probe.shape[1], probe.shape[2]

    def forward(self, images: torch.Tensor) -> VisionEncoderOutput:
        out = self.visual.forward_intermediates(images, indices=[self.block], output_fmt="NLC")
        return VisionEncoderOutput(patch_tokens=out["image_intermediates"][0], pooled=out["image_features"])

    def forward_naflex(self, patches: torch.Tensor, patch_coord: torch.Tensor,
                       patch_valid: torch.Tensor) -> NaFlexEncoderOutput:
        """NaFlex towers: patch sequences (contrastive.data.naflex.naflex_batch) -> each image's valid patch tokens
        in its own grid, and the pooled embedding."""
        if not is_naflex_tower(self.visual):
            raise ConfigError(f"forward_naflex needs a NaFlex image tower, not {type(self.visual).__name__}")
        trunk = self.visual.trunk
        inputs = {"patches": patches, "patch_coord": patch_coord, "patch_valid": patch_valid}
        out = trunk.forward_intermediates(inputs, indices=[self.block], output_fmt="NLC", output_dict=True)
        pooled = self.visual.head(trunk.forward_head(out["image_features"], patch_valid=patch_valid))
        grids = (patch_coord.amax(dim=1) + 1).tolist()  # (rows, columns) per image
        tokens = [layer[valid].reshape(rows, columns, -1) for layer, valid, (rows, columns)
                  in zip(out["image_intermediates"][0], patch_valid, grids)]
        return NaFlexEncoderOutput(patch_tokens=tokens, pooled=pooled)


def load_vision_encoder(path: str | Path, feature_layer: int | None = None) -> VisionEncoder:
    """A bundle directory -> VisionEncoder in eval mode (feature_layer defaults to the one recorded at export)."""
    from contrastive.models import build_model

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{path} is not an encoder bundle: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    record = json.loads((path / CONFIG_FILE).read_text())
    if record.get("bundle_version") != BUNDLE_VERSION:
        raise ConfigError(f"{path / CONFIG_FILE} has bundle_version {record.get('bundle_version')}; "
                         f"this contrastive reads version {BUNDLE_VERSION}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in record["model_config"].items() if k in known})
    model_cfg.pretrained = None
    # Building the whole model keeps each architecture's own tower tweaks (CapPa drops the projection, CoCa adds
    # an attentional pooler) in one place, models/; only the image tower is kept.
    visual = build_model(model_cfg).visual
    visual.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    preprocess = Preprocess(**record["preprocess"])
    layer = record["feature_layer"] if feature_layer is None else feature_layer
    return VisionEncoder(visual, preprocess, layer).eval()


@EXPORT_FORMATS.register("bundle")
def export_bundle(model: nn.Module, out: Path) -> Exported:
    visual, preprocess = model.visual, preprocess_from_config(model.cfg)
    encoder = VisionEncoder(visual, preprocess)  # checks the tower gives patch tokens before writing anything
    record = {
        "bundle_version": BUNDLE_VERSION,
        "model_config": dataclasses.asdict(model.cfg),
        "preprocess": preprocess.to_dict(),
        "feature_layer": encoder.feature_layer,
        "depth": encoder.depth,
        "hidden_size": encoder.hidden_size,
        "num_patches": encoder.num_patches,
    }
    save_file({name: tensor.detach().contiguous() for name, tensor in visual.state_dict().items()},
              str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Exported(
        format="bundle",
        architecture=f"{type(visual).__name__} image tower, {encoder.depth} blocks, "
                     f"{encoder.num_patches} patch tokens of width {encoder.hidden_size}",
        usage=("from contrastive.export import load_vision_encoder\n"
               "encoder = load_vision_encoder(EXPORT_DIR)  # feature_layer=-2 (penultimate) by default\n"
               "out = encoder(encoder.preprocess.transform()(image)[None])\n"
               "out.patch_tokens  # (B, N, D) for a connector; out.pooled  # (B, E)"),
    )
