"""SigLIP 2's objective (Tschannen et al. 2025): the sigmoid loss plus the LocCa decoder loss.

loss = siglip + locca.decoder_weight * decoder, where the decoder term is CapPa's per-example token-mean
cross-entropy over each sample's target text (its prompt is context: contrastive.models.locca). Each sample's
task (captioning, referring expression, grounded captioning) was drawn by the data pipeline
(contrastive.data.boxes); the per-task decoder losses are logged beside the total, each the mean over that task's
samples on this rank in this step (0 when the step drew none).

Accumulation (trainer.accumulation_steps=K, contrastive.train.step.FeatureCache): the sigmoid term is a function of
the whole batch's features, so it runs once on the cached features; the decoder term is a mean of per-example
terms, each normalised by its own example's scored tokens (never by a count over the batch), so each micro-batch of
B/K examples adds decoder_weight * (sum of its examples' terms) / B from its own forward, and the sum over
micro-batches is the whole batch's term exactly. Each sample's task was drawn by the data pipeline from that
sample's own generator, before the batch is split. Under DDP and FSDP2 the decoder term is a per-example mean over
equal local batches, so the ranks' mean is the global-batch value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive.config import LossConfig
from contrastive.errors import ConfigError
from contrastive.losses.cappa import IGNORE_INDEX, refuse_block_size, require_captions
from contrastive.losses.registry import FEATURE_CACHE_AND_PER_EXAMPLE_MEAN, LOSSES
from contrastive.losses.siglip import siglip_loss
from contrastive.types import DECODER_TASK_NAMES, Batch, Collectives, LossOutput, ModelOutput


def per_example_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B,): each example's mean cross-entropy over its scored tokens."""
    token_losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none").view(targets.shape)
    return token_losses.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)


class SigLipLoccaLoss:
    accumulation = FEATURE_CACHE_AND_PER_EXAMPLE_MEAN

    def __init__(self, cfg: LossConfig) -> None:
        refuse_block_size(cfg)
        if cfg.label_smoothing:
            raise ConfigError("loss.label_smoothing is not used by loss=siglip_locca (coordinates are exact targets)")
        self.cfg = cfg
        self.locca = cfg.locca  # read by the trainer: the data pipeline draws the decoder tasks
        self.per_example_weight = cfg.locca.decoder_weight

    def feature_terms(self, output: ModelOutput, batch: Batch, collectives: Collectives) -> LossOutput:
        """The sigmoid term, over the global batch's features."""
        if output.logit_bias is None:
            raise ConfigError("loss=siglip_locca needs model.arch=siglip_locca with model.init_logit_bias set")
        sigmoid = siglip_loss(output.image_features, output.text_features, output.logit_scale, output.logit_bias,
                              collectives)
        return LossOutput(loss=sigmoid, metrics={"contrastive_loss": sigmoid.detach(),
                                                 "logit_scale": output.logit_scale.detach(),
                                                 "logit_bias": output.logit_bias.detach()})

    def per_example_terms(self, output: ModelOutput, batch: Batch) -> torch.Tensor:
        """(B,): each example's decoder loss, the mean over its target tokens."""
        require_captions(output, "siglip_locca")
        if batch.decoder_tasks is None:
            raise ConfigError("loss=siglip_locca needs the data pipeline's decoder tasks")
        return per_example_token_loss(output.caption_logits, output.caption_targets)

    def combine(self, features: LossOutput, per_example: torch.Tensor, batch: Batch) -> LossOutput:
        """The total over the batch, with the decoder term and each task's logged."""
        decoder = per_example.mean()
        metrics = {**features.metrics, "decoder_loss": decoder.detach()}
        detached = per_example.detach()
        for task, name in enumerate(DECODER_TASK_NAMES):
            chosen = batch.decoder_tasks.to(detached.device) == task
            metrics[f"{name}_loss"] = (detached * chosen).sum() / chosen.sum().clamp(min=1)
        return LossOutput(loss=features.loss + self.per_example_weight * decoder, metrics=metrics)

    def __call__(self, output: ModelOutput, batch: Batch, collectives: Collectives) -> LossOutput:
        per_example = self.per_example_terms(output, batch)
        return self.combine(self.feature_terms(output, batch, collectives), per_example, batch)


LOSSES.register("siglip_locca")(SigLipLoccaLoss)
