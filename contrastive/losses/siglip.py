"""SigLIP sigmoid loss over the global batch (Zhai et al. 2023), with text chunks passed around the ring of ranks.

loss = -(1/N) sum over all N x N global pairs of log sigmoid(z_ij (t x_i . y_j + b)), z_ij = +1 on matching pairs
and -1 elsewhere. Each rank keeps its images and scores them against its own texts (the only chunk holding
positives), then against every other rank's texts as they travel around the ring, both ways at once, so a
world of W ranks takes ceil((W - 1) / 2) exchange steps. A rank's loss is the sum over its rows divided by its
local batch B, so the mean over ranks is the global loss, and no rank ever holds logits wider than B.
With `loss.block_size` each chunk is scored block by block and recomputed in backward: O(B x block) memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive.config import LossConfig
from contrastive.errors import ConfigError
from contrastive.losses.blockwise import blockwise_sigmoid_loss
from contrastive.losses.registry import FEATURE_CACHE, LOSSES
from contrastive.types import Batch, Collectives, LossOutput, ModelOutput


def sigmoid_pair_loss(
    image_features: torch.Tensor,  # (B, D)
    text_features: torch.Tensor,  # (C, D), one rank's chunk
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    diagonal_positive: bool,
    block_size: int | None = None,
) -> torch.Tensor:
    """Sum of -log sigmoid(z * logit) over the (B, C) pairs; matching pairs lie on the diagonal when present."""
    if block_size is not None:
        return blockwise_sigmoid_loss(image_features, text_features, logit_scale, logit_bias,
                                      diagonal_positive, block_size)
    logits = logit_scale * image_features @ text_features.T + logit_bias  # (B, C)
    signs = -torch.ones_like(logits)
    if diagonal_positive:
        signs.diagonal().fill_(1.0)
    return -F.logsigmoid(signs * logits).sum()


def siglip_loss(
    image_features: torch.Tensor,  # (B, D) local
    text_features: torch.Tensor,  # (B, D) local
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    collectives: Collectives,
    block_size: int | None = None,
) -> torch.Tensor:
    def chunk_loss(texts: torch.Tensor, diagonal_positive: bool) -> torch.Tensor:
        return sigmoid_pair_loss(image_features, texts, logit_scale, logit_bias, diagonal_positive, block_size)

    total = chunk_loss(text_features, diagonal_positive=True)
    # After step k, to_next holds rank (r - k)'s texts and to_previous rank (r + k)'s.
    to_next = to_previous = text_features
    for _ in range((collectives.world_size - 1) // 2):
        from_previous, from_next = collectives.ring_exchange_with_grad(to_next, to_previous)
        total = total + chunk_loss(from_previous, False) + chunk_loss(from_next, False)
        to_next, to_previous = from_previous, from_next
    if (collectives.world_size - 1) % 2:  # an even world leaves the chunk from the opposite side of the ring
        from_previous, _ = collectives.ring_exchange_with_grad(to_next)
        total = total + chunk_loss(from_previous, False)
    return total / image_features.shape[0]


class SigLipLoss:
    accumulation = FEATURE_CACHE

    def __init__(self, cfg: LossConfig) -> None:
        if cfg.block_size is not None and cfg.block_size <= 0:
            raise ConfigError(f"loss.block_size must be a positive integer or null, got {cfg.block_size}")
        self.cfg = cfg

    def __call__(self, output: ModelOutput, batch: Batch, collectives: Collectives) -> LossOutput:
        if output.logit_bias is None:
            raise ConfigError("loss=siglip needs a learnable logit bias: set model.init_logit_bias (SigLIP uses -10)")
        loss = siglip_loss(output.image_features, output.text_features, output.logit_scale, output.logit_bias,
                           collectives, self.cfg.block_size)
        return LossOutput(
            loss=loss,
            metrics={
                "contrastive_loss": loss.detach(),
                "logit_scale": output.logit_scale.detach(),
                "logit_bias": output.logit_bias.detach(),
            },
        )


LOSSES.register("siglip")(SigLipLoss)
