"""CapPa captioning loss (Tschannen et al. 2023): next-token cross-entropy on the caption.

Per example, the mean over its caption tokens (padding ignored), then the mean over the batch: long and short
captions weigh the same. The model decides teacher forcing or parallel prediction per example (see
contrastive.models.cappa); the targets are the caption tokens either way. Equal local batches make the mean of
the per-rank losses the global-batch loss, so no communication is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive.config import LossConfig
from contrastive.errors import ConfigError
from contrastive.losses.registry import LOSSES, PER_EXAMPLE_MEAN
from contrastive.types import Batch, Collectives, LossOutput, ModelOutput

IGNORE_INDEX = -100


def caption_loss(
    logits: torch.Tensor,  # (B, T, V)
    targets: torch.Tensor,  # (B, T) int64, IGNORE_INDEX where not scored
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (per-example token-mean cross-entropy averaged over the batch, accuracy over scored tokens)."""
    token_losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none", label_smoothing=label_smoothing).view(targets.shape)  # (B, T)
    scored = targets != IGNORE_INDEX
    per_example = token_losses.sum(dim=1) / scored.sum(dim=1).clamp(min=1)
    correct = (logits.argmax(dim=-1) == targets) & scored
    accuracy = correct.sum() / scored.sum().clamp(min=1)
    return per_example.mean(), accuracy


def require_captions(output: ModelOutput, loss_name: str) -> None:
    if output.caption_logits is None or output.caption_targets is None:
        raise ConfigError(f"loss={loss_name} needs a captioning model (model.arch=cappa or coca); "
                         f"this model returns no caption logits")


def refuse_block_size(cfg: LossConfig) -> None:
    """Captioning cross-entropy has no (B, N) logits to score in blocks: a set block_size would silently do nothing."""
    if cfg.block_size is not None:
        raise ConfigError(f"loss.block_size applies to loss=clip and loss=siglip; loss={cfg.name} does not score "
                         f"in blocks: leave it null")


class CapPaLoss:
    accumulation = PER_EXAMPLE_MEAN

    def __init__(self, cfg: LossConfig) -> None:
        refuse_block_size(cfg)
        self.cfg = cfg

    def __call__(self, output: ModelOutput, batch: Batch, collectives: Collectives) -> LossOutput:
        require_captions(output, "cappa")
        loss, accuracy = caption_loss(output.caption_logits, output.caption_targets, self.cfg.label_smoothing)
        return LossOutput(loss=loss, metrics={"caption_loss": loss.detach(), "token_accuracy": accuracy.detach()})


LOSSES.register("cappa")(CapPaLoss)
