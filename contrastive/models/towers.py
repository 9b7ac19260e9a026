"""The open_clip tower configuration every architecture shares (open_clip's base config merged with our overrides),
the image size it gives, and the size checks every reader of an image tower's size applies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import open_clip
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from timm.layers import to_2tuple
from torch import nn

from contrastive.config import ModelConfig, check_known_keys
from contrastive.errors import ConfigError


def tower_configs(cfg: ModelConfig) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(embed_dim, vision_cfg, text_cfg) as open_clip expects them: an open_clip base config plus our overrides.

    The dicts hold only the keys that are set: open_clip's factory tells a timm or Hugging Face tower by a key's
    presence, and the open_clip export writes them as they are. Read a setting through `CLIPTextCfg(**text)` or
    `CLIPVisionCfg(**vision)`, which fill in open_clip's defaults for the keys not set.
    """
    base: dict[str, Any] = {}
    if cfg.open_clip_name:
        base = open_clip.get_model_config(cfg.open_clip_name)
        if base is None:
            raise ConfigError(
                f"model.open_clip_name={cfg.open_clip_name!r} is not an open_clip model config; "
                f"see open_clip.list_models()"
            )
    check_known_keys(cfg.vision, CLIPVisionCfg, "model.vision")
    check_known_keys(cfg.text, CLIPTextCfg, "model.text")
    vision = {**base.get("vision_cfg", {}), **cfg.vision}
    text = {**base.get("text_cfg", {}), **cfg.text}
    embed_dim = cfg.embed_dim if cfg.embed_dim is not None else base.get("embed_dim")
    if embed_dim is None:
        raise ConfigError("model.embed_dim is required when model.open_clip_name is not set")
    if vision.get("timm_model_pretrained"):
        raise ConfigError("model.vision.timm_model_pretrained downloads weights; "
                          "use model.pretrained with a local file")
    return embed_dim, vision, text


def check_timm_image_size(visual: nn.Module, vision: dict[str, Any]) -> None:
    """open_clip's TimmModel builds a timm tower at the size its timm entrypoint fixes and ignores
    model.vision.image_size; the two must agree, or the preprocessing would feed images the tower refuses."""
    img_size = getattr(getattr(getattr(visual, "trunk", None), "patch_embed", None), "img_size", None)
    configured = CLIPVisionCfg(**vision).image_size
    if img_size is not None and tuple(img_size) != tuple(to_2tuple(configured)):
        raise ConfigError(f"model.vision.image_size={configured} but the timm tower "
                          f"{vision.get('timm_model_name')!r} takes {tuple(img_size)} images; set image_size to "
                          f"{img_size[0]}")


def square_side(size: int | Sequence[int], what: str, error: type[ConfigError] = ConfigError) -> int:
    """The side of a size given as one int or (height, width); `what` names the size in the error if not square."""
    height, width = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if height != width:
        raise error(f"{what} is {height}x{width}, not square; only square sizes are supported")
    return int(height)


def model_image_size(cfg: ModelConfig) -> int:
    """The side of the square images the image tower takes."""
    _, vision, _ = tower_configs(cfg)
    return square_side(CLIPVisionCfg(**vision).image_size, "model.vision.image_size")
