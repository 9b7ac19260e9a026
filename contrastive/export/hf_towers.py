"""Weight-name adapters: our vision towers -> transformers' CLIP and SigLIP vision models (config + state dict).

Two tower shapes map exactly:
- CLIP-style, open_clip's own `VisionTransformer`: class token, pre-LN, class-token pooling, post-LN,
  linear projection -> `CLIPVisionModel` / `CLIPVisionModelWithProjection`.
- SigLIP-style, a timm `VisionTransformer` behind open_clip's `TimmModel`: no class token, no pre-LN, final LN,
  attention-pool ('map') head, no projection -> `SiglipVisionModel`.
- NaFlex SigLIP 2, a timm `NaFlexVit` of that layout with a linear patch embedding of (row, column, channel)
  patches and a square position table resized bilinearly with antialiasing -> `Siglip2VisionModel`.
Anything else raises `ValueError` naming the feature transformers' classes cannot express. Layer scale is folded
into the linear layer it follows: x + g * (W h + b) == x + (g W) h + g b.

State-dict names are relative to the vision transformer (`embeddings.`, `encoder.layers.N.`, `post_layernorm.`);
the caller adds whatever prefix the installed transformers version uses.
"""

from __future__ import annotations

from typing import Any

import torch
from open_clip.transformer import QuickGELU as OpenClipQuickGELU
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from contrastive.config import require
from contrastive.errors import ConfigError
from contrastive.models.towers import square_side

Weights = dict[str, torch.Tensor]


def activation_name(module: nn.Module) -> str:
    """The transformers `hidden_act` that computes exactly what `module` computes."""
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_pytorch_tanh"
    if type(module).__name__ == "GELUTanh":  # timm's: F.gelu(x, approximate="tanh")
        return "gelu_pytorch_tanh"
    if isinstance(module, OpenClipQuickGELU) or type(module).__name__ == "QuickGELU":
        return "quick_gelu"
    raise ConfigError(f"activation {type(module).__name__} has no transformers equivalent "
                      f"(gelu, gelu_pytorch_tanh, quick_gelu)")


def layer_norm_eps(norm: nn.Module, where: str) -> float:
    if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine or norm.bias is None:
        raise ConfigError(f"{where} is {type(norm).__name__}, not an affine LayerNorm with bias as transformers uses")
    return norm.eps


def layer_scale(module: nn.Module) -> torch.Tensor | None:
    """The per-channel gain of a layer-scale module (open_clip `gamma`, timm `gamma`), None for Identity."""
    if isinstance(module, nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        raise ConfigError(f"unexpected layer-scale module {type(module).__name__}")
    return gamma.detach()


def folded_linear(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None,
                  prefix: str) -> Weights:
    """`prefix.weight` / `prefix.bias` of the linear layer with the following layer scale multiplied in."""
    weight = weight.detach().clone()
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias.detach().clone()
    if gamma is not None:
        weight, bias = gamma[:, None] * weight, gamma * bias
    return {f"{prefix}.weight": weight, f"{prefix}.bias": bias}


def _norm(norm: nn.LayerNorm, prefix: str) -> Weights:
    return {f"{prefix}.weight": norm.weight.detach().clone(), f"{prefix}.bias": norm.bias.detach().clone()}


def _split_in_proj(weight: torch.Tensor, bias: torch.Tensor, prefix: str) -> Weights:
    """nn.MultiheadAttention's packed [q; k; v] projection -> q_proj / k_proj / v_proj."""
    out = {}
    for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weight.detach().chunk(3), bias.detach().chunk(3)):
        out[f"{prefix}.{name}.weight"], out[f"{prefix}.{name}.bias"] = w.clone(), b.clone()
    return out


def clip_vision(visual: nn.Module) -> tuple[dict[str, Any], Weights]:
    """(CLIPVisionConfig kwargs, state dict) for an open_clip VisionTransformer with class-token pooling."""
    require(isinstance(visual, VisionTransformer),
            f"the CLIP export needs open_clip's VisionTransformer; this tower is {type(visual).__name__} "
            f"(timm SigLIP-style towers export as SiglipVisionModel, ResNets do not export)")
    require(visual.attn_pool is None,
            "this tower pools with an attentional pooler; CLIPVisionModel pools the class token")
    # final_ln_after_pool changes nothing for class-token pooling: LayerNorm acts on each token alone.
    require(visual.pool_type == "tok",
            f"this tower pools by {visual.pool_type!r}; CLIPVisionModel pools the class token ('tok')")
    require(not isinstance(visual.ln_pre, nn.Identity),
            "this tower has no pre-LN (no_ln_pre); CLIPVisionModel always applies one")
    require(visual.conv1.bias is None, "the patch embedding has a bias; CLIPVisionModel's has none")
    blocks = list(visual.transformer.resblocks)
    require(all(type(block) is ResidualAttentionBlock for block in blocks),
            "this tower uses open_clip's custom attention blocks (qk-norm, scaled cosine or extra norms), "
            "which CLIPVisionModel cannot express")
    first = blocks[0]
    eps = layer_norm_eps(visual.ln_pre, "ln_pre")
    config = {
        "hidden_size": visual.conv1.out_channels,
        "intermediate_size": first.mlp.c_fc.out_features,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": first.attn.num_heads,
        "num_channels": visual.conv1.in_channels,
        "image_size": square_side(visual.image_size, "the tower's image size"),
        "patch_size": square_side(visual.patch_size, "the tower's patch size"),
        "hidden_act": activation_name(first.mlp.gelu),
        "layer_norm_eps": eps,
    }
    weights: Weights = {
        "embeddings.class_embedding": visual.class_embedding.detach().clone(),
        "embeddings.patch_embedding.weight": visual.conv1.weight.detach().clone(),
        "embeddings.position_embedding.weight": visual.positional_embedding.detach().clone(),
        **_norm(visual.ln_pre, "pre_layrnorm"),
        **_norm(visual.ln_post, "post_layernorm"),
    }
    for index, block in enumerate(blocks):
        require(activation_name(block.mlp.gelu) == config["hidden_act"], "blocks use different activations")
        require(layer_norm_eps(block.ln_1, "ln_1") == eps and layer_norm_eps(block.ln_2, "ln_2") == eps,
                "the tower's LayerNorms use different eps values; transformers has one layer_norm_eps")
        prefix = f"encoder.layers.{index}"
        weights.update(_norm(block.ln_1, f"{prefix}.layer_norm1"))
        weights.update(_norm(block.ln_2, f"{prefix}.layer_norm2"))
        weights.update(_split_in_proj(block.attn.in_proj_weight, block.attn.in_proj_bias, f"{prefix}.self_attn"))
        weights.update(folded_linear(block.attn.out_proj.weight, block.attn.out_proj.bias, layer_scale(block.ls_1),
                                     f"{prefix}.self_attn.out_proj"))
        weights.update(folded_linear(block.mlp.c_fc.weight, block.mlp.c_fc.bias, None, f"{prefix}.mlp.fc1"))
        weights.update(folded_linear(block.mlp.c_proj.weight, block.mlp.c_proj.bias, layer_scale(block.ls_2),
                                     f"{prefix}.mlp.fc2"))
    if visual.proj is not None:
        config["projection_dim"] = visual.proj.shape[1]
        weights["visual_projection.weight"] = visual.proj.detach().T.clone()  # x @ P == Linear with weight P^T
    return config, weights


def _timm_trunk(visual: nn.Module, kind: str = "VisionTransformer") -> nn.Module:
    trunk = getattr(visual, "trunk", None)
    require(trunk is not None and type(trunk).__name__ == kind,
            f"the SigLIP export needs a timm {kind} tower; this tower is {type(visual).__name__}")
    head = list(getattr(visual, "head", nn.Sequential()))
    require(not head, "this timm tower has an open_clip projection head (timm_proj linear/mlp); "
                      "SigLIP's vision models end at the attention-pool head, so train with timm_proj=none")
    return trunk


def _siglip_pool_and_blocks(trunk: nn.Module, config: dict[str, Any]) -> Weights:
    """The blocks, final norm and attention-pool head of a SigLIP-layout timm trunk (VisionTransformer or
    NaFlexVit), under SiglipVisionModel's and Siglip2VisionModel's shared names; fills in config's block fields."""
    require(trunk.num_prefix_tokens == 0,
            "this timm ViT has a class or register token; SigLIP's vision models have none (CLIP-style towers "
            "export from open_clip's own VisionTransformer)")
    require(trunk.global_pool == "map" and trunk.attn_pool is not None,
            f"this timm ViT pools by {trunk.global_pool!r}; SigLIP's vision models pool with an attention-pool "
            f"('map') head")
    require(isinstance(trunk.norm_pre, nn.Identity),
            "this timm ViT has a pre-LN (pre_norm); SigLIP's vision models have none")
    require(isinstance(trunk.fc_norm, nn.Identity),
            "this timm ViT normalises after pooling (fc_norm); SigLIP's vision models do not")
    pool = trunk.attn_pool
    require(pool.latent_len == 1 and pool.pos_embed is None and pool.pool == "token" and pool.mlp is not None
            and isinstance(pool.q_norm, nn.Identity) and isinstance(pool.k_norm, nn.Identity),
            "the attention-pool head is not SigLIP's (one latent query, MLP, no qk-norm or position embedding)")
    blocks = list(trunk.blocks)
    require(all(type(block).__name__ == "Block" for block in blocks),
            "this timm ViT uses a non-standard block type, which SigLIP's vision models cannot express")
    first = blocks[0]
    eps = layer_norm_eps(trunk.norm, "the final norm")
    config.update({
        "hidden_size": trunk.embed_dim,
        "intermediate_size": first.mlp.fc1.out_features,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": first.attn.num_heads,
        "hidden_act": activation_name(first.mlp.act),
        "layer_norm_eps": eps,
        "vision_use_head": True,
    })
    require(pool.num_heads == config["num_attention_heads"] and activation_name(pool.mlp.act) == config["hidden_act"]
            and pool.mlp.fc1.out_features == config["intermediate_size"],
            "the attention-pool head's heads / activation / MLP width differ from the blocks'; SigLIP shares them")
    weights: Weights = {
        **_norm(trunk.norm, "post_layernorm"),
        "head.probe": pool.latent.detach().clone(),
        "head.attention.in_proj_weight": torch.cat([pool.q.weight, pool.kv.weight]).detach().clone(),
        "head.attention.in_proj_bias": torch.cat([pool.q.bias, pool.kv.bias]).detach().clone(),
        **folded_linear(pool.proj.weight, pool.proj.bias, None, "head.attention.out_proj"),
        **_norm(pool.norm, "head.layernorm"),
        **folded_linear(pool.mlp.fc1.weight, pool.mlp.fc1.bias, None, "head.mlp.fc1"),
        **folded_linear(pool.mlp.fc2.weight, pool.mlp.fc2.bias, None, "head.mlp.fc2"),
    }
    for index, block in enumerate(blocks):
        attn = block.attn
        require(isinstance(attn.q_norm, nn.Identity) and isinstance(attn.norm, nn.Identity)
                and isinstance(block.mlp.norm, nn.Identity) and attn.qkv.bias is not None,
                "the blocks use qk-norm, extra norms or a bias-free qkv, which SigLIP's vision models cannot express")
        require(activation_name(block.mlp.act) == config["hidden_act"], "blocks use different activations")
        require(layer_norm_eps(block.norm1, "norm1") == eps and layer_norm_eps(block.norm2, "norm2") == eps,
                "the tower's LayerNorms use different eps values; transformers has one layer_norm_eps")
        prefix = f"encoder.layers.{index}"
        weights.update(_norm(block.norm1, f"{prefix}.layer_norm1"))
        weights.update(_norm(block.norm2, f"{prefix}.layer_norm2"))
        weights.update(_split_in_proj(attn.qkv.weight, attn.qkv.bias, f"{prefix}.self_attn"))
        weights.update(folded_linear(attn.proj.weight, attn.proj.bias, layer_scale(block.ls1),
                                     f"{prefix}.self_attn.out_proj"))
        weights.update(folded_linear(block.mlp.fc1.weight, block.mlp.fc1.bias, None, f"{prefix}.mlp.fc1"))
        weights.update(folded_linear(block.mlp.fc2.weight, block.mlp.fc2.bias, layer_scale(block.ls2),
                                     f"{prefix}.mlp.fc2"))
    return weights


def siglip_vision(visual: nn.Module) -> tuple[dict[str, Any], Weights]:
    """(SiglipVisionConfig kwargs, state dict) for a timm ViT without class token and with a 'map' head."""
    trunk = _timm_trunk(visual)
    # timm's dynamic_img_size mode (our towers run in it for trainer.stages) resamples position embeddings only
    # for other grids; at the configured size it computes what SiglipVisionModel computes, which the parity tests
    # check, and transformers resamples for other sizes with interpolate_pos_encoding=True.
    config = {
        "num_channels": trunk.patch_embed.proj.in_channels,
        "image_size": square_side(trunk.patch_embed.img_size, "the tower's image size"),
        "patch_size": square_side(trunk.patch_embed.patch_size, "the tower's patch size"),
    }
    weights = _siglip_pool_and_blocks(trunk, config)
    weights.update({
        "embeddings.patch_embedding.weight": trunk.patch_embed.proj.weight.detach().clone(),
        "embeddings.patch_embedding.bias": trunk.patch_embed.proj.bias.detach().clone(),
        "embeddings.position_embedding.weight": trunk.pos_embed.detach()[0].clone(),
    })
    return config, weights


def siglip2_vision(visual: nn.Module) -> tuple[dict[str, Any], Weights]:
    """(Siglip2VisionConfig kwargs, state dict) for a timm NaFlexVit of SigLIP's layout."""
    trunk = _timm_trunk(visual, "NaFlexVit")
    embeds = trunk.embeds
    require(embeds.is_linear and embeds.channels_last and isinstance(embeds.norm, nn.Identity)
            and getattr(embeds, "norm_input", None) is None,
            "this NaFlexVit does not embed (row, column, channel) patches with one linear layer, as "
            "Siglip2VisionModel does")
    require(embeds.pos_embed_type == "learned" and embeds.pos_embed_interp_mode == "bilinear"
            and embeds.pos_embed_antialias and not embeds.pos_embed_align_corners
            and not embeds.pos_embed_ar_preserving and not embeds.pos_embed_use_grid_sample,
            "this NaFlexVit resizes its position table otherwise than Siglip2VisionModel (learned, bilinear, "
            "antialiased, align_corners=False, per axis)")
    table = embeds.pos_embed.detach()[0]  # (H, W, D)
    require(table.shape[0] == table.shape[1], f"the position table is {tuple(table.shape[:2])}, not square as "
                                              f"Siglip2VisionModel's")
    patch_size = square_side(embeds.patch_size, "the tower's patch size")
    config = {
        "num_channels": embeds.proj.in_features // (patch_size * patch_size),
        "patch_size": patch_size,
        "num_patches": table.shape[0] * table.shape[1],
    }
    weights = _siglip_pool_and_blocks(trunk, config)
    weights.update({
        "embeddings.patch_embedding.weight": embeds.proj.weight.detach().clone(),
        "embeddings.patch_embedding.bias": embeds.proj.bias.detach().clone(),
        "embeddings.position_embedding.weight": table.reshape(-1, table.shape[-1]).clone(),
    })
    return config, weights
