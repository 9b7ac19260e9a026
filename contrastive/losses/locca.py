"""SigLIP 2's objective (Tschannen et al. 2025): the sigmoid loss plus the LocCa decoder loss.

loss = siglip + locca.decoder_weight * decoder, where the decoder term is CapPa's per-example token-mean
cross-entropy over each sample's target text (its prompt is context: contrastive.models.locca). Each sample's
task (captioning, referring expression, grounded captioning) was drawn by the data pipeline
(contrastive.data.boxes); the per-task decoder losses are logged beside the total, each the mean over that task's
samples on this rank in this step (0 when the step drew none).

Accumulation: the sigmoid term needs the whole global batch's features and the decoder term its caption logits,
which no feature cache holds; so only trainer.accumulation_steps=1 is exact, and the step refuses more
(contrastive.train.step). Under DDP and FSDP2 the decoder term is a per-example mean over equal local batches,
so the ranks' mean is the global-batch value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive.config import LossConfig
from contrastive.errors import ConfigError
from contrastive.losses.cappa import IGNORE_INDEX, refuse_block_size, require_captions
from contrastive.losses.registry import LOSSES, WHOLE_BATCH
from contrastive.losses.siglip import siglip_loss
from contrastive.types import DECODER_TASK_NAMES, Batch, Collectives, LossOutput, ModelOutput


def per_example_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B,): each example's mean cross-entropy over its scored tokens."""
    token_losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none").view(targets.shape)
    return token_losses.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)


class SigLipLoccaLoss:
    accumulation = WHOLE_BATCH

    def __init__(self, cfg: LossConfig) -> None:
        refuse_block_size(cfg)
        if cfg.label_smoothing:
            raise ConfigError("loss.label_smoothing is not used by loss=siglip_locca (coordinates are exact targets)")
        self.cfg = cfg
        self.locca = cfg.locca  # read by the trainer: the data pipeline draws the decoder tasks

    def __call__(self, output: ModelOutput, batch: Batch, collectives: Collectives) -> LossOutput:
        require_captions(output, "siglip_locca")
        if output.logit_bias is None or batch.decoder_tasks is None:
            raise ConfigError("loss=siglip_locca needs model.arch=siglip_locca with model.init_logit_bias set, and "
                              "the data pipeline's decoder tasks")
        sigmoid = siglip_loss(output.image_features, output.text_features, output.logit_scale, output.logit_bias,
                              collectives)
        per_example = per_example_token_loss(output.caption_logits, output.caption_targets)  # (B,)
        decoder = per_example.mean()
        metrics = {"contrastive_loss": sigmoid.detach(), "decoder_loss": decoder.detach(),
                   "logit_scale": output.logit_scale.detach(), "logit_bias": output.logit_bias.detach()}
        detached = per_example.detach()
        for task, name in enumerate(DECODER_TASK_NAMES):
            chosen = batch.decoder_tasks.to(detached.device) == task
            metrics[f"{name}_loss"] = (detached * chosen).sum() / chosen.sum().clamp(min=1)
        return LossOutput(loss=sigmoid + self.cfg.locca.decoder_weight * decoder, metrics=metrics)


LOSSES.register("siglip_locca")(SigLipLoccaLoss)
