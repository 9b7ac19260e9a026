"""Patch-text similarity maps, MaskCLIP-style, where they can show something; where not, the reason.

MaskCLIP (Zhou et al., 2022) puts each patch token into the joint image-text space by taking the last vision
block's value path (no attention mixing, no MLP, no residual), then the final norm and the projection. Only an
open_clip ViT whose embedding is that projection of a token (no attention pooler) has that path; timm towers pool
with a learned head, and grids under MIN_GRID patches a side are too coarse to locate anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

METHOD = ("MaskCLIP-style: the last block's value path, then the final norm and the projection into the joint "
          "space, compared by cosine with the class-name text embedding")
MIN_GRID = 7  # patches per side below which a heat map cannot locate anything in the image


def patch_grid(visual: nn.Module) -> int | None:
    """Patches per side of an open_clip VisionTransformer (its `grid_size`), or None for other towers."""
    grid = getattr(visual, "grid_size", None)
    return int(grid[0]) if grid is not None else None


def patch_map_note(model: nn.Module) -> str | None:
    """Why no patch-text maps can be drawn for `model` (its towers, pooling or grid); None where they can."""
    visual = getattr(model, "visual", None)
    if not hasattr(model, "encode_text"):
        return f"{type(model).__name__} has no text embedding to compare patches with (a captioner): no maps."
    if visual is None or patch_grid(visual) is None:
        return (f"the image tower ({type(visual).__name__}) pools with a learned head (e.g. timm's attention "
                f"pooling for SigLIP); its patch tokens are not in the joint space, so no maps are drawn. Method "
                f"for open_clip ViTs: {METHOD}.")
    if getattr(visual, "attn_pool", None) is not None or visual.proj is None:
        return ("the image embedding comes from an attention pooler over the patch tokens (CoCa); the patch tokens "
                f"themselves are not in the joint space, so no maps are drawn. Method for ViTs without a pooler: "
                f"{METHOD}.")
    grid = patch_grid(visual)
    if grid < MIN_GRID:
        return (f"the patch grid is {grid}x{grid}: too coarse to locate anything, so no maps are drawn. Method "
                f"where the grid is finer: {METHOD}.")
    if not visual.transformer.resblocks[-1].attn.batch_first:
        return f"this open_clip version runs attention sequence-first; maps ({METHOD}) need batch-first blocks."
    return None


@torch.no_grad()
def patch_embeddings(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, grid, grid, D) normalised patch embeddings in the joint space of an open_clip VisionTransformer."""
    last = visual.transformer.resblocks[-1]
    captured = {}
    handle = last.register_forward_pre_hook(lambda module, args: captured.__setitem__("tokens", args[0]))
    try:
        visual(images)  # the tower's own forward up to the last block's input (B, 1 + grid^2, width)
    finally:
        handle.remove()
    _, _, value_weight = last.attn.in_proj_weight.chunk(3)
    _, _, value_bias = last.attn.in_proj_bias.chunk(3)
    values = last.ls_1(last.attn.out_proj(F.linear(last.ln_1(captured["tokens"]), value_weight, value_bias)))
    patches = visual.ln_post(values[:, 1:]) @ visual.proj  # the class token leads
    grid = patch_grid(visual)
    return F.normalize(patches.float(), dim=-1).view(len(images), grid, grid, -1)
