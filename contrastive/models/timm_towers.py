"""SigLIP-architecture image towers that timm does not ship (fixed-size and NaFlex), registered under timm's model
registry so that `model.vision.timm_model_name` (open_clip's TimmModel) builds them like timm's own
`vit_*_siglip_*` towers.

open_clip's TimmModel passes no widths or image size to timm, so a tower's shape lives in its entrypoint. Each one
here is timm's SigLIP layout (`vit_base_patch16_siglip_224`: no class token, no pre-norm, LayerNorm eps 1e-6, exact
GELU, an attention-pool ('map') head) at another size.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model
from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg, _create_naflexvit
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

# timm's register_model reads this module's `default_cfgs`: each tower's input size, no classifier, no weights.
default_cfgs = generate_default_cfgs({
    "vit_tiny_patch7_siglip_28": {"input_size": (3, 28, 28), "num_classes": 0, "mean": (0.5, 0.5, 0.5),
                                  "std": (0.5, 0.5, 0.5)},
    "naflexvit_tiny_patch7_siglip": {"input_size": (3, 28, 28), "num_classes": 0, "mean": (0.5, 0.5, 0.5),
                                     "std": (0.5, 0.5, 0.5)},
    "vit_tiny_patch8_siglip_64": {"input_size": (3, 64, 64), "num_classes": 0, "mean": (0.5, 0.5, 0.5),
                                  "std": (0.5, 0.5, 0.5)},
})


@register_model
def vit_tiny_patch7_siglip_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The demo's SigLIP tower for 28x28 images: 16 patches of 7x7, width 128, 4 blocks of 4 heads, MLP 512 (the
    cost of tiny_clip's image tower, plus the attention-pool head). Initialised as big_vision initialises SigLIP
    (timm's 'jax' mode: Xavier-uniform linears, LeCun-normal patch embedding); timm's own SigLIP entrypoints keep
    timm's default initialisation."""
    args = dict(img_size=28, patch_size=7, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0, class_token=False,
                global_pool="map", weight_init="jax")
    return _create_vision_transformer("vit_tiny_patch7_siglip_28", pretrained=False, **{**args, **kwargs})


@register_model
def naflexvit_tiny_patch7_siglip(pretrained: bool = False, **kwargs) -> NaFlexVit:
    """The demo's NaFlex SigLIP tower: vit_tiny_patch7_siglip_28's widths as timm's NaFlexVit with the layout of
    timm's `naflexvit_base_patch16_siglip` (tanh GELU, 'map' head, learned position embeddings resized bilinearly
    per image grid, as Siglip2VisionModel resizes them). Its position table is 4 x 4 patches (28 x 28 pixels)."""
    cfg = NaFlexVitCfg(patch_size=7, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0, act_layer="gelu_tanh",
                       global_pool="map", pos_embed_interp_mode="bilinear", pos_embed_grid_size=(4, 4),
                       weight_init="jax")
    return _create_naflexvit("naflexvit_tiny_patch7_siglip", pretrained=False, cfg=cfg, **kwargs)


@register_model
def vit_tiny_patch8_siglip_64(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The grounding demo's SigLIP tower for 64x64 canvases (contrastive.data.grounding): 64 patches of 8x8, so a
    Fashion-MNIST item spans a few patches; otherwise vit_tiny_patch7_siglip_28."""
    args = dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0, class_token=False,
                global_pool="map", weight_init="jax")
    return _create_vision_transformer("vit_tiny_patch8_siglip_64", pretrained=False, **{**args, **kwargs})
