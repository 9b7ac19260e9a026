"""Connectors: vision-encoder patch tokens (B, N, D_vision) -> LLM input embeddings (B, N', D_llm).

The three standard designs, each ready to train inside a VLM (feed the output as `inputs_embeds`):

- `MLPProjector` (LLaVA-1.5): Linear(D_vision, D_llm) -> GELU -> Linear(D_llm, D_llm), per token. N' = N.
- `AttentionPooler` (Qwen-VL, Perceiver-resampler style): `num_queries` learned queries (default 64) attend to
  the patch tokens once, in D_llm with `num_heads` heads (default 8), each query LayerNormed and the keys/values
  LayerNormed and linearly projected from D_vision. N' = num_queries, whatever N is.
- `PatchMerger` (Qwen2.5-VL): LayerNorm each token, concatenate each 2x2 neighbourhood of the patch grid into
  one 4*D_vision vector, then Linear(4*D_vision, 4*D_vision) -> GELU -> Linear(4*D_vision, D_llm).
  N' = N / 4; the grid must be square with an even side (tokens in row-major order, class token dropped), or
  given as `grid=(rows, columns)`, both even (a NaFlex image's own grid).

NaFlex towers (contrastive.export.bundle.VisionEncoder.forward_naflex) give each image's tokens on its own grid:
the attention pooler takes a padded batch with `valid` (B, N), the patch merger one image's grid at a time.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from contrastive.errors import ConfigError
from contrastive.registry import Registry

CONNECTORS: Registry = Registry("connector")


@CONNECTORS.register("mlp")
class MLPProjector(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(tokens)))  # (B, N, D_llm)


@CONNECTORS.register("attention_pool")
class AttentionPooler(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int, num_queries: int = 64, num_heads: int = 8) -> None:
        super().__init__()
        if llm_dim % num_heads:
            raise ConfigError(f"llm_dim={llm_dim} is not divisible by num_heads={num_heads}")
        self.queries = nn.Parameter(torch.randn(num_queries, llm_dim) * llm_dim ** -0.5)
        self.norm_queries = nn.LayerNorm(llm_dim)
        self.norm_tokens = nn.LayerNorm(vision_dim)
        self.attn = nn.MultiheadAttention(llm_dim, num_heads, kdim=vision_dim, vdim=vision_dim, batch_first=True)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, N, D_vision); valid (B, N) bool: the tokens to attend to (None: all)."""
        tokens = self.norm_tokens(tokens)  # (B, N, D_vision)
        queries = self.norm_queries(self.queries).unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B, Q, D_llm)
        padding = None if valid is None else ~valid
        return self.attn(queries, tokens, tokens, key_padding_mask=padding, need_weights=False)[0]  # (B, Q, D_llm)


@CONNECTORS.register("patch_merger")
class PatchMerger(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int, merge_size: int = 2) -> None:
        super().__init__()
        self.merge_size = merge_size
        merged = vision_dim * merge_size ** 2
        self.norm = nn.LayerNorm(vision_dim)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, llm_dim))

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """tokens (B, rows * columns, D_vision) in row-major order; grid (rows, columns), None: a square one."""
        batch, count, dim = tokens.shape
        m = self.merge_size
        rows, columns = grid if grid is not None else (math.isqrt(count),) * 2
        if rows * columns != count or rows % m or columns % m:
            raise ConfigError(f"PatchMerger needs a grid with sides divisible by {m}; got {count} tokens "
                             f"on {'a square grid' if grid is None else f'a {rows} x {columns} grid'} "
                             f"(drop the class token first; NaFlex grids pass grid=(rows, columns))")
        cells = self.norm(tokens).reshape(batch, rows // m, m, columns // m, m, dim)  # rows, offset, cols, offset
        merged = cells.permute(0, 1, 3, 2, 4, 5).reshape(batch, count // (m * m), m * m * dim)  # (B, N/m^2, m^2 D)
        return self.mlp(merged)  # (B, N/m^2, D_llm)


def build_connector(name: str, vision_dim: int, llm_dim: int, **options) -> nn.Module:
    """A connector by registry name: mlp | attention_pool | patch_merger (options: the class's keyword arguments)."""
    return CONNECTORS.get(name)(vision_dim, llm_dim, **options)
