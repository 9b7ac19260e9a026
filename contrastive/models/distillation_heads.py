"""Distillation's adaptor heads (RADIO-style): one small MLP per teacher maps the student's pooled image features,
and one its patch tokens, into that teacher's feature space. They train with the student and serve training only
(encoders loaded from a checkpoint drop them). The loss side: contrastive.losses.distillation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from contrastive.errors import ConfigError


def _mlp(width_in: int, hidden: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, hidden), nn.GELU(), nn.Linear(hidden, width_out))


@contextmanager
def captured_patch_tokens(visual: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, every forward of an open_clip VisionTransformer `visual` leaves its patch tokens (B, N, W)
    (the transformer's output without the class token, before the final norm) under "tokens"."""
    transformer = getattr(visual, "transformer", None)
    if transformer is None or getattr(visual, "class_embedding", None) is None:
        raise ConfigError(f"patch-token distillation needs an open_clip ViT image tower with a class token, not "
                          f"{type(visual).__name__}; set loss.distillation.patch_weight=0")
    captured: dict[str, torch.Tensor] = {}
    handle = transformer.register_forward_hook(lambda module, args, output: captured.__setitem__("tokens",
                                                                                                   output[:, 1:]))
    try:
        yield captured
    finally:
        handle.remove()


class DistillationHeads(nn.Module):
    """`teachers`: name -> (pooled feature width, patch token width or None where patch terms are off)."""

    def __init__(self, embed_dim: int, token_width: int, teachers: dict[str, tuple[int, int | None]],
                 hidden: int) -> None:
        super().__init__()
        self.pooled = nn.ModuleDict({name: _mlp(embed_dim, hidden, width) for name, (width, _) in teachers.items()})
        self.tokens = nn.ModuleDict({name: _mlp(token_width, hidden, width)
                                     for name, (_, width) in teachers.items() if width is not None})

    def forward(self, features: torch.Tensor, tokens: torch.Tensor | None):
        """(B, D) unnormalised pooled features and (B, N, W) patch tokens -> per teacher (B, D_t) and (B, N, W_t)."""
        pooled = {name: head(features) for name, head in self.pooled.items()}
        adapted_tokens = {name: head(tokens) for name, head in self.tokens.items()} if tokens is not None else {}
        return pooled, adapted_tokens
