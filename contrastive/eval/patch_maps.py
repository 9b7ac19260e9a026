"""Whether patch-text similarity maps can show anything for a model, and why not where they cannot.

The method they would use is MaskCLIP's: the last vision block's value path (no attention mixing, no MLP), then
the final norm and the projection, which puts each patch token into the joint image-text space.
"""

from __future__ import annotations

from torch import nn

METHOD = ("MaskCLIP-style: the last block's value path, then the final norm and the projection into the joint "
          "space, compared by cosine with the class-name text embedding")
MIN_GRID = 7  # patches per side below which a heat map cannot locate anything in the image


def patch_grid(visual: nn.Module) -> int | None:
    """Patches per side of an open_clip VisionTransformer (its `grid_size`), or None for other towers."""
    grid = getattr(visual, "grid_size", None)
    return int(grid[0]) if grid is not None else None


def patch_map_note(model: nn.Module) -> str:
    """Why this report draws no patch-text maps for `model` (the tower, its pooling, or its grid)."""
    visual = getattr(model, "visual", None)
    if not hasattr(model, "encode_text"):
        return f"{type(model).__name__} has no text embedding to compare patches with (a captioner): no maps."
    if visual is None or patch_grid(visual) is None:
        return (f"the image tower ({type(visual).__name__}) pools with a learned head (e.g. timm's attention "
                f"pooling for SigLIP); its patch tokens are not in the joint space, so no maps are drawn. Method "
                f"for open_clip ViTs: {METHOD}.")
    if getattr(visual, "attn_pool", None) is not None:
        return ("the image embedding comes from an attention pooler over the patch tokens (CoCa); the patch tokens "
                f"themselves are not in the joint space, so no maps are drawn. Method for ViTs without a pooler: "
                f"{METHOD}.")
    grid = patch_grid(visual)
    if grid < MIN_GRID:
        return (f"the patch grid is {grid}x{grid}: too coarse to locate anything, so no maps are drawn. Method "
                f"where the grid is finer: {METHOD}.")
    return (f"a {grid}x{grid} patch grid in the joint space; maps by {METHOD} are not drawn by this version of the "
            f"report.")
