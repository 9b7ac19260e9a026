"""NaFlex image towers: timm's `NaFlexVit` behind open_clip's `TimmModel` (model.vision.timm_model_name
`naflexvit_*`), fed patch sequences with 2D positions and a padding mask (contrastive.data.naflex).

timm's NaFlexVit resizes its position table to each image's grid, masks padding patches out of attention and out
of the attention-pool head; open_clip's TimmModel calls the trunk on an image tensor only, so the NaFlex call is
made here. The same tower also takes ordinary (B, 3, H, W) images of any multiple of its patch size.
"""

from __future__ import annotations

import re

import torch
from open_clip.timm_model import TimmModel
from torch import nn

from contrastive.errors import ConfigError

NAFLEX_PREFIX = "naflexvit_"


def is_naflex_tower(visual: nn.Module) -> bool:
    return isinstance(visual, TimmModel) and type(visual.trunk).__name__ == "NaFlexVit"


def naflex_patch_size(timm_model_name: str | None) -> int | None:
    """The patch side of a NaFlex timm tower named in a model config (None for other towers); timm's NaFlex
    entrypoints name it (`..._patch16_...`)."""
    if not timm_model_name or not timm_model_name.startswith(NAFLEX_PREFIX):
        return None
    found = re.search(r"_patch(\d+)", timm_model_name)
    if found is None:
        raise ConfigError(f"model.vision.timm_model_name={timm_model_name!r}: a NaFlex tower's name must give its "
                          f"patch size (_patchN_)")
    return int(found.group(1))


def naflex_trunk_tokens(visual: TimmModel, patches: torch.Tensor, coord: torch.Tensor,
                        valid: torch.Tensor) -> torch.Tensor:
    """(B, N, D): the trunk's final-norm token states; padding positions hold values to ignore."""
    return visual.trunk.forward_features(patches, patch_coord=coord, patch_valid=valid)["patches"]


def encode_naflex(visual: nn.Module, patches: torch.Tensor, coord: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, D) pooled image features of patch sequences (B, N, P*P*3) with coordinates (B, N, 2) and valid (B, N)."""
    if not is_naflex_tower(visual):
        raise ConfigError(f"NaFlex patch inputs need a timm naflexvit_* image tower, not {type(visual).__name__}")
    tokens = naflex_trunk_tokens(visual, patches, coord, valid)
    pooled = visual.trunk.forward_head(tokens, patch_valid=valid)
    return visual.head(pooled)
