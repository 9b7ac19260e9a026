"""Tiny models for the export and connector tests: CLIP-style and SigLIP-style towers with random weights."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer
from torch import nn

from contrastive.config import ModelConfig
from contrastive.models import build_model
from tests.conftest import CONF_DIR


@register_model
def vit_export_test_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 3-block SigLIP-shaped timm ViT for 28x28 inputs: no class token, 'map' head, layer scale."""
    args = dict(img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, class_token=False,
                init_values=0.1, global_pool="map")
    return _create_vision_transformer("vit_export_test_siglip", pretrained=False, **{**args, **kwargs})


def tiny_config(**changes) -> ModelConfig:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                              OmegaConf.load(CONF_DIR / "model/test_tiny.yaml")))
    for key, value in changes.items():
        setattr(cfg, key, {**getattr(cfg, key), **value} if isinstance(value, dict) else value)
    return cfg


def clip_style_config(quick_gelu: bool = False) -> ModelConfig:
    return tiny_config(vision={"layers": 3, "ls_init_value": 0.1}, quick_gelu=quick_gelu)


def siglip_style_config() -> ModelConfig:
    return tiny_config(vision={"image_size": 28, "timm_model_name": "vit_export_test_siglip", "timm_pool": "map",
                               "timm_proj": "none"}, init_logit_bias=-10.0)


def randomized(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """A model whose every parameter (layer-scale gains and norms included) is random, so nothing maps by luck."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3 + (0.5 if parameter.ndim == 1 else 0.0))
    return model


def registered_model_config(arch: str) -> ModelConfig:
    """The tiny config of each registered architecture (conf/model/tiny_<arch>.yaml)."""
    values = OmegaConf.load(CONF_DIR / f"model/tiny_{arch}.yaml")
    decoder = values.get("decoder")
    if decoder is not None and "parallel_prob" in decoder and OmegaConf.is_interpolation(decoder, "parallel_prob"):
        values.decoder.parallel_prob = 0.75  # interpolated from loss.* in the composed config
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), values))
