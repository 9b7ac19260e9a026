"""SigLIP 2's self-distillation terms, the loss side (the model side: contrastive.models.self_distillation).

DINO/iBOT cross-entropies between the teacher's centred, sharpened distribution over K prototypes and the
student's: local-to-global (SILC: each local crop of the student against each global view of the teacher) and
masked prediction (TIPS/iBOT: the student's patch tokens of a masked global view against the teacher's of the
unmasked one, on the masked patches only). Both are means of per-example terms, added to the wrapped objective's
loss once the model returns them (from the switch step on). The teacher's batch means, over every rank, go back to
the model in `teacher_statistics` for its centres.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive.config import SelfDistillationConfig
from contrastive.types import Batch, Collectives, LossOutput, ModelOutput


def entropy(probabilities: torch.Tensor) -> torch.Tensor:  # (..., K) -> (...), nats
    return -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1)


class WithSelfDistillation:
    """`objective`'s loss plus the self-distillation terms, weighted by loss.self_distillation.*_weight."""

    def __init__(self, objective, cfg: SelfDistillationConfig) -> None:
        self.objective, self.cfg = objective, cfg
        self.accumulation = objective.accumulation

    def _teacher(self, logits: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        return F.softmax((logits - centre) / self.cfg.teacher_temp, dim=-1)

    def __call__(self, output: ModelOutput, batch: Batch, collectives: Collectives) -> LossOutput:
        result = self.objective(output, batch, collectives)
        if output.student_local_logits is None:
            return result
        cfg = self.cfg
        teacher = self._teacher(output.teacher_global_logits, output.global_centre)  # (B, G, K)
        student = F.log_softmax(output.student_local_logits / cfg.student_temp, dim=-1)  # (B, L, K)
        # every (local crop, global view) pair of an example: (B, L, G)
        local_loss = -torch.einsum("bgk,blk->blg", teacher, student).mean()
        teacher_patch = self._teacher(output.teacher_patch_logits, output.patch_centre)  # (B, G, N, K)
        student_patch = F.log_softmax(output.student_patch_logits / cfg.student_temp, dim=-1)
        mask = output.patch_mask.float()  # (B, G, N)
        patch_ce = -(teacher_patch * student_patch).sum(-1)  # (B, G, N)
        masked_loss = ((patch_ce * mask).sum(-1) / mask.sum(-1)).mean()  # mean over each view's masked patches
        loss = result.loss + cfg.local_weight * local_loss + cfg.masked_weight * masked_loss
        with torch.no_grad():
            teacher_entropy = entropy(teacher).mean()
            marginal = collectives.all_reduce_mean(teacher.mean((0, 1)))
            statistics = {
                "global_centre": collectives.all_reduce_mean(output.teacher_global_logits.mean((0, 1))),
                "patch_centre": collectives.all_reduce_mean(output.teacher_patch_logits.mean((0, 1, 2))),
            }
            metrics = {
                **result.metrics,
                "distill/local_loss": local_loss.detach(),
                "distill/masked_loss": masked_loss.detach(),
                "distill/teacher_entropy": teacher_entropy,  # per view: low is sharp
                "distill/teacher_marginal_entropy": entropy(marginal),  # of the batch mean: low is collapse
                # KL(teacher || student) over (local, global) pairs: cross-entropy less the teacher's entropy
                "distill/teacher_student_kl": local_loss.detach() - teacher_entropy,
            }
        return LossOutput(loss=loss, metrics=metrics, teacher_statistics=statistics)
