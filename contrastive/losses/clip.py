"""CLIP softmax contrastive loss over the global batch (Radford et al. 2021).

Each rank scores its local images against every text in the global batch and its local texts against every
image, so the mean of the per-rank losses is the symmetric cross-entropy over the global batch.
With `loss.block_size` the (B, N) logits are never materialised: an online log-sum-exp runs over blocks of
columns and is recomputed in backward, so the loss needs O(B x (D + block)) memory beyond the gathered features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive.config import LossConfig
from contrastive.errors import ConfigError
from contrastive.losses.blockwise import blockwise_log_sum_exp
from contrastive.losses.registry import FEATURE_CACHE, LOSSES
from contrastive.types import Batch, Collectives, LossOutput, ModelOutput


def _gather_global_batch(image_features: torch.Tensor, text_features: torch.Tensor, collectives: Collectives):
    """Every rank's features, (N, D) each, and the global column of each local row's matching pair, (B,)."""
    local_batch = image_features.shape[0]
    targets = torch.arange(local_batch, device=image_features.device) + collectives.rank * local_batch
    return (collectives.all_gather_with_grad(image_features), collectives.all_gather_with_grad(text_features),
            targets)


def clip_loss(
    image_features: torch.Tensor,  # (B, D) local
    text_features: torch.Tensor,  # (B, D) local
    logit_scale: torch.Tensor,
    collectives: Collectives,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (loss, image-to-text accuracy of the local rows)."""
    all_image_features, all_text_features, targets = _gather_global_batch(image_features, text_features, collectives)
    logits_per_image = logit_scale * image_features @ all_text_features.T  # (B, N)
    logits_per_text = logit_scale * text_features @ all_image_features.T  # (B, N)
    loss = (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2
    accuracy = (logits_per_image.argmax(dim=-1) == targets).float().mean()
    return loss, accuracy


def blockwise_clip_loss(
    image_features: torch.Tensor,  # (B, D) local
    text_features: torch.Tensor,  # (B, D) local
    logit_scale: torch.Tensor,
    collectives: Collectives,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`clip_loss` as -logit(matching pair) + log-sum-exp over the row, the latter computed block by block."""
    all_image_features, all_text_features, targets = _gather_global_batch(image_features, text_features, collectives)
    image_log_sum_exp, best_text = blockwise_log_sum_exp(image_features, all_text_features, logit_scale, block_size)
    text_log_sum_exp, _ = blockwise_log_sum_exp(text_features, all_image_features, logit_scale, block_size)
    matching_logits = logit_scale * (image_features * text_features).sum(dim=-1)  # (B,), the same in both directions
    loss = ((image_log_sum_exp - matching_logits).mean() + (text_log_sum_exp - matching_logits).mean()) / 2
    accuracy = (best_text == targets).float().mean()
    return loss, accuracy


class ClipLoss:
    accumulation = FEATURE_CACHE

    def __init__(self, cfg: LossConfig) -> None:
        if cfg.block_size is not None and cfg.block_size <= 0:
            raise ConfigError(f"loss.block_size must be a positive integer or null, got {cfg.block_size}")
        self.cfg = cfg

    def __call__(self, output: ModelOutput, batch: Batch, collectives: Collectives) -> LossOutput:
        if self.cfg.block_size is None:
            loss, accuracy = clip_loss(output.image_features, output.text_features, output.logit_scale, collectives)
        else:
            loss, accuracy = blockwise_clip_loss(output.image_features, output.text_features, output.logit_scale,
                                                 collectives, self.cfg.block_size)
        return LossOutput(
            loss=loss,
            metrics={
                "contrastive_loss": loss.detach(),
                "i2t_accuracy": accuracy.detach(),
                "logit_scale": output.logit_scale.detach(),
            },
        )


LOSSES.register("clip")(ClipLoss)
