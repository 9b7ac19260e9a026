"""CoCa loss (Yu et al. 2022): clip_weight * contrastive + caption_weight * captioning.

The contrastive term is CLIP's over the global batch (features gathered across ranks); the captioning term is
the per-example token-mean cross-entropy of CapPa's loss.
"""

from __future__ import annotations

from contrastive.config import LossConfig
from contrastive.losses.cappa import caption_loss, refuse_block_size, require_captions
from contrastive.losses.clip import clip_loss
from contrastive.losses.registry import LOSSES, WHOLE_BATCH
from contrastive.types import Batch, Collectives, LossOutput, ModelOutput


class CoCaLoss:
    accumulation = WHOLE_BATCH  # a whole-batch contrastive term beside caption logits no cache holds

    def __init__(self, cfg: LossConfig) -> None:
        refuse_block_size(cfg)  # its contrastive term is the plain CLIP loss
        self.cfg = cfg

    def __call__(self, output: ModelOutput, batch: Batch, collectives: Collectives) -> LossOutput:
        require_captions(output, "coca")
        contrastive, i2t_accuracy = clip_loss(output.image_features, output.text_features, output.logit_scale,
                                              collectives)
        captioning, token_accuracy = caption_loss(output.caption_logits, output.caption_targets,
                                                  self.cfg.label_smoothing)
        loss = self.cfg.clip_weight * contrastive + self.cfg.caption_weight * captioning
        return LossOutput(
            loss=loss,
            metrics={
                "contrastive_loss": contrastive.detach(),
                "caption_loss": captioning.detach(),
                "i2t_accuracy": i2t_accuracy.detach(),
                "token_accuracy": token_accuracy.detach(),
                "logit_scale": output.logit_scale.detach(),
            },
        )


LOSSES.register("coca")(CoCaLoss)
