"""Towers that take inputs smaller (or larger) than they were built for, with every parameter kept at its built size.

Training stages (trainer.stages) feed lower-resolution images and shorter texts for part of a run, and length
bucketing (data.length_bucketing) pads each batch only to its own longest caption. Resizing parameters would
break FSDP2 shards, optimiser moments and compiled graphs, so the position embeddings stay on their base grid and
are resampled in the forward pass instead:

- open_clip's VisionTransformer: its patch position embeddings are resampled bicubically (antialiased when
  shrinking, as timm and FlexiViT do) to the input's patch grid; the class token's embedding is kept.
- timm vision towers: timm's own `dynamic_img_size` (set on the trunk when the model is built).
- open_clip text towers: the first L rows of the position embedding and the top-left L x L block of the causal
  mask. A causal tower pooled at its end-of-text token gives the same features for a caption padded to L as for
  the same caption padded to the full context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import nn


def resampled_position_embedding(embedding: torch.Tensor, base_grid: tuple[int, int],
                                 grid: tuple[int, int]) -> torch.Tensor:
    """(1 + gh * gw, D) class + patch position embeddings on `base_grid` -> the same on `grid`."""
    if tuple(grid) == tuple(base_grid):
        return embedding
    width = embedding.shape[-1]
    patches = embedding[1:].reshape(1, *base_grid, width).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    patches = F.interpolate(patches.float(), size=tuple(grid), mode="bicubic", align_corners=False, antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(-1, width).to(embedding.dtype)  # (gh' * gw', D)
    return torch.cat([embedding[:1], patches])


def _vision_transformer_at_grid(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """open_clip's VisionTransformer.forward with the position embeddings resampled to the images' patch grid."""
    x = visual.conv1(images)  # (B, D, gh, gw)
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)  # (B, gh * gw, D)
    class_token = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([class_token, x], dim=1)
    x = x + resampled_position_embedding(visual.positional_embedding, visual.grid_size, grid).to(x.dtype)
    x = visual.ln_pre(visual.patch_dropout(x))
    x = visual.transformer(x)
    pooled, tokens = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return (pooled, tokens) if visual.output_tokens else pooled


def encode_image_any_size(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The image tower's output for square images of any multiple of its patch size."""
    if isinstance(visual, VisionTransformer) and tuple(images.shape[-2:]) != tuple(visual.image_size):
        return _vision_transformer_at_grid(visual, images)
    return visual(images)


def allow_any_image_size(visual: nn.Module) -> None:
    """Let a timm ViT trunk take any image size, as timm's `dynamic_img_size=True` builds it (outputs at the built
    size are unchanged: timm resamples only when the grid differs). open_clip builds timm trunks without it."""
    trunk = getattr(visual, "trunk", None) if isinstance(visual, TimmModel) else None
    if trunk is None or not hasattr(trunk, "dynamic_img_size") or getattr(trunk, "pos_embed", None) is None:
        return
    from timm.layers import Format  # timm is only needed for timm towers

    trunk.dynamic_img_size = True
    trunk.patch_embed.strict_img_size = False
    trunk.patch_embed.flatten = False  # flattened after the position embeddings, as timm's dynamic mode does
    trunk.patch_embed.output_fmt = Format.NHWC


def encode_text_any_length(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """An open_clip CLIP's (or CustomTextCLIP's) text features for tokens of any length up to its context length."""
    length = tokens.shape[1]
    text = getattr(clip, "text", None)
    if text is None:  # open_clip.CLIP keeps its text tower's modules on the model itself
        if length == clip.positional_embedding.shape[0]:
            return clip.encode_text(tokens)
        return _clip_text_at_length(clip, tokens)
    if isinstance(text, TextTransformer) and text.attn_mask is not None and text.attn_mask.shape[-1] != length:
        return _text_transformer_at_length(text, tokens)
    return clip.encode_text(tokens)  # Hugging Face towers take any length below their maximum


def _clip_text_at_length(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text on the first `length` position embeddings and the causal mask's corner."""
    length = tokens.shape[1]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype)  # (B, L, D)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
    x = clip.ln_final(clip.transformer(x, attn_mask=mask))
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    if clip.text_projection is None:
        return x
    return clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection


def _text_transformer_at_length(text: TextTransformer, tokens: torch.Tensor) -> torch.Tensor:
    # TextTransformer slices its position embeddings itself and its mask only when it builds a padding mask; its
    # full-size causal mask (a buffer, never trained or sharded) is swapped for its corner for this call.
    full_mask = text.attn_mask
    text.attn_mask = full_mask[:tokens.shape[1], :tokens.shape[1]]
    try:
        return text(tokens)
    finally:
        text.attn_mask = full_mask
