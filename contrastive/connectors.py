"""Connectors: vision-encoder patch tokens (B, N, D_vision) -> LLM input embeddings (B, N', D_llm).

The three standard designs, each ready to train inside a VLM (feed the output as `inputs_embeds`):

- `MLPProjector` (LLaVA-1.5): Linear(D_vision, D_llm) -> GELU -> Linear(D_llm, D_llm), per token. N' = N.
- `AttentionPooler` (Qwen-VL, Perceiver-resampler style): `num_queries` learned queries (default 64) attend to
  the patch tokens once, in D_llm with `num_heads` heads (default 8), each query LayerNormed and the keys/values
  LayerNormed and linearly projected from D_vision. N' = num_queries, whatever N is.
- `PatchMerger` (Qwen2.5-VL): LayerNorm each token, concatenate each 2x2 neighbourhood of the patch grid into
  one 4*D_vision vector, then Linear(4*D_vision, 4*D_vision) -> GELU -> Linear(4*D_vision, D_llm).
  N' = N / 4; the grid must be square with an even side (tokens in row-major order, class token dropped).
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

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.norm_tokens(tokens)  # (B, N, D_vision)
        queries = self.norm_queries(self.queries).unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B, Q, D_llm)
        return self.attn(queries, tokens, tokens, need_weights=False)[0]  # (B, Q, D_llm)


@CONNECTORS.register("patch_merger")
class PatchMerger(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int, merge_size: int = 2) -> None:
        super().__init__()
        self.merge_size = merge_size
        merged = vision_dim * merge_size ** 2
        self.norm = nn.LayerNorm(vision_dim)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, llm_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, count, dim = tokens.shape
        side, m = math.isqrt(count), self.merge_size
        if side * side != count or side % m:
            raise ConfigError(f"PatchMerger needs a square grid with a side divisible by {m}; got {count} tokens "
                             f"(drop the class token first)")
        grid = self.norm(tokens).reshape(batch, side // m, m, side // m, m, dim)  # rows, row offset, cols, col offset
        merged = grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, (side // m) ** 2, m * m * dim)  # (B, N/m^2, m^2 D)
        return self.mlp(merged)  # (B, N/m^2, D_llm)


def build_connector(name: str, vision_dim: int, llm_dim: int, **options) -> nn.Module:
    """A connector by registry name: mlp | attention_pool | patch_merger (options: the class's keyword arguments)."""
    return CONNECTORS.get(name)(vision_dim, llm_dim, **options)
