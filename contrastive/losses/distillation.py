"""Distillation from frozen teachers: the loss side (teachers: contrastive.train.teachers; adaptor heads:
contrastive.models.distillation_heads).

Terms, each weighted by loss.distillation.*_weight and, per teacher, by its `weight`, added to the wrapped objective:

- contrastive: KL(teacher || student) between the image-to-text and text-to-image softmaxes over the global batch
  (each rank's rows against every rank's columns, like the CLIP loss). Blockwise (loss.block_size), a row's KL is
  sum_j p_ij t_ij - lse_t - sum_j p_ij s_ij + lse_s: it needs the row log-sum-exps of teacher and student and the
  teacher-weighted sum of the student's logits, each computed block by block (the weighted sum recomputed in
  backward), so no rank holds more than (B, block) logits and nobody builds the global N x N matrix.
- sigmoid (SigLIP students): per-pair binary KL between the teacher's sigmoid probabilities and the student's, summed
  over every global pair and divided by the local batch, as the SigLIP loss is; no normaliser, so no log-sum-exp.
- feature: the student's pooled image features and patch tokens through a learned adaptor head per teacher
  (RADIO-style) against that teacher's, standardised per teacher: 1 - cosine plus smooth-L1. Student patch grids
  are resized to the teacher's (bilinear) where they differ.

Per-teacher standardisation is PHI-S's isotropic scale without its Hadamard rotation (documented simplification):
targets become (x - mean) / sqrt(mean per-dimension variance), with the mean and variance of the teacher's features
over the global batch (all ranks), so every teacher's targets have unit variance per dimension on average and no
teacher dominates by its feature scale. The rotation only spreads variance evenly over dimensions; cosine is
invariant to it, and smooth-L1 changes little, so the simpler form keeps the balancing that matters here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from contrastive.config import DistillationConfig
from contrastive.losses.blockwise import blockwise_log_sum_exp
from contrastive.losses.registry import FEATURE_CACHE, WHOLE_BATCH
from contrastive.types import Batch, Collectives, LossOutput, ModelOutput


def _row_log_sum_exp(queries, keys, scale, block_size: int | None) -> torch.Tensor:
    if block_size is None:
        return torch.logsumexp(scale * queries @ keys.T, dim=1)
    return blockwise_log_sum_exp(queries, keys, scale, block_size)[0]


def _weighted_logit_block(student_queries, student_keys, student_scale, teacher_queries, teacher_keys, teacher_scale,
                          teacher_log_sum_exp):
    """Per row, sum_j p_ij s_ij over one block of columns (p the teacher's softmax, s the student's logits)."""
    teacher_probabilities = torch.exp(teacher_scale * teacher_queries @ teacher_keys.T - teacher_log_sum_exp[:, None])
    return (teacher_probabilities * (student_scale * student_queries @ student_keys.T)).sum(dim=1)


def _teacher_weighted_student_logits(student_queries, student_keys, student_scale, teacher_queries, teacher_keys,
                                     teacher_scale, teacher_log_sum_exp, block_size: int) -> torch.Tensor:
    """(B,) sum_j p_ij s_ij, each block of columns recomputed in backward (activation checkpointing), so only one
    (B, block) block lives at a time."""
    total = student_queries.new_zeros(student_queries.shape[0])
    for start in range(0, student_keys.shape[0], block_size):
        columns = slice(start, start + block_size)
        total = total + checkpoint(_weighted_logit_block, student_queries, student_keys[columns], student_scale,
                                   teacher_queries, teacher_keys[columns], teacher_scale, teacher_log_sum_exp,
                                   use_reentrant=False)
    return total


def _row_kl(student_queries, student_keys, student_scale, teacher_queries, teacher_keys, teacher_scale,
            block_size: int | None) -> torch.Tensor:
    """(B,) KL(teacher row softmax || student row softmax)."""
    if block_size is None:
        teacher_log = F.log_softmax(teacher_scale * teacher_queries @ teacher_keys.T, dim=1)
        student_log = F.log_softmax(student_scale * student_queries @ student_keys.T, dim=1)
        return (teacher_log.exp() * (teacher_log - student_log)).sum(dim=1)
    with torch.no_grad():  # the teacher's terms are constants for the student
        teacher_lse = _row_log_sum_exp(teacher_queries, teacher_keys, teacher_scale, block_size)
        teacher_term = _teacher_weighted_student_logits(teacher_queries, teacher_keys, teacher_scale, teacher_queries,
                                                        teacher_keys, teacher_scale, teacher_lse, block_size)
    student_lse = _row_log_sum_exp(student_queries, student_keys, student_scale, block_size)
    cross = _teacher_weighted_student_logits(student_queries, student_keys, student_scale, teacher_queries,
                                             teacher_keys, teacher_scale, teacher_lse, block_size)
    return teacher_term - teacher_lse - cross + student_lse


def contrastive_distillation_loss(student_images, student_texts, student_scale, teacher_images, teacher_texts,
                                  teacher_scale, collectives: Collectives, block_size: int | None = None):
    """Mean over the local rows of KL(teacher || student), image-to-text and text-to-image averaged; the mean over
    ranks is the KL averaged over the global batch's rows. Features (B, D) local and L2-normalised."""
    all_student_images = collectives.all_gather_with_grad(student_images)
    all_student_texts = collectives.all_gather_with_grad(student_texts)
    all_teacher_images = collectives.all_gather_with_grad(teacher_images)
    all_teacher_texts = collectives.all_gather_with_grad(teacher_texts)
    image_to_text = _row_kl(student_images, all_student_texts, student_scale, teacher_images, all_teacher_texts,
                            teacher_scale, block_size)
    text_to_image = _row_kl(student_texts, all_student_images, student_scale, teacher_texts, all_teacher_images,
                            teacher_scale, block_size)
    return (image_to_text.mean() + text_to_image.mean()) / 2


def _sigmoid_kl_block(student_images, student_texts, student_scale, student_bias, teacher_images, teacher_texts,
                      teacher_scale, teacher_bias):
    """Sum over one block of pairs of the binary KL(teacher sigmoid || student sigmoid)."""
    teacher_logits = teacher_scale * teacher_images @ teacher_texts.T + teacher_bias
    student_logits = student_scale * student_images @ student_texts.T + student_bias
    teacher_probability = torch.sigmoid(teacher_logits)
    # -q log sigma(s) - (1 - q) log sigma(-s) = softplus(s) - q s; less the teacher's own binary entropy
    cross_entropy = F.softplus(student_logits) - teacher_probability * student_logits
    teacher_entropy = F.softplus(teacher_logits) - teacher_probability * teacher_logits
    return (cross_entropy - teacher_entropy).sum()


def sigmoid_distillation_loss(student_images, student_texts, student_scale, student_bias, teacher_images,
                              teacher_texts, teacher_scale, teacher_bias, collectives: Collectives,
                              block_size: int | None = None):
    """Sum over this rank's images and every global text of the per-pair binary KL, divided by the local batch:
    the mean over ranks is the global sum over the N x N pairs divided by N, as in the SigLIP loss."""
    all_student_texts = collectives.all_gather_with_grad(student_texts)
    all_teacher_texts = collectives.all_gather_with_grad(teacher_texts)
    if block_size is None:
        total = _sigmoid_kl_block(student_images, all_student_texts, student_scale, student_bias, teacher_images,
                                  all_teacher_texts, teacher_scale, teacher_bias)
    else:
        total = student_images.new_zeros(())
        for start in range(0, all_student_texts.shape[0], block_size):
            columns = slice(start, start + block_size)
            total = total + checkpoint(_sigmoid_kl_block, student_images, all_student_texts[columns], student_scale,
                                       student_bias, teacher_images, all_teacher_texts[columns], teacher_scale,
                                       teacher_bias, use_reentrant=False)
    return total / student_images.shape[0]


def standardize(features: torch.Tensor, collectives: Collectives) -> torch.Tensor:
    """(..., D) teacher features less their global-batch mean, over the square root of the mean per-dimension
    variance (an isotropic scale: PHI-S without its rotation, see the module docstring)."""
    flat = features.reshape(-1, features.shape[-1]).detach()
    mean = collectives.all_reduce_mean(flat.mean(dim=0))
    variance = collectives.all_reduce_mean(((flat - mean) ** 2).mean())
    return (features - mean) / variance.clamp_min(1e-12).sqrt()


def resize_token_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, n*n, W) patch tokens on an n x n grid -> (B, grid*grid, W), bilinear where the grids differ."""
    side = round(tokens.shape[1] ** 0.5)
    if side == grid:
        return tokens
    if side * side != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} patch tokens do not form a square grid")
    planes = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    resized = F.interpolate(planes, size=(grid, grid), mode="bilinear", align_corners=False)
    return resized.flatten(2).transpose(1, 2)


def feature_distillation_loss(adapted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over examples (and tokens) of 1 - cosine plus smooth-L1 (mean over dimensions), (..., D) each."""
    cosine = F.cosine_similarity(adapted, target, dim=-1)
    smooth_l1 = F.smooth_l1_loss(adapted, target, reduction="none").mean(dim=-1)
    return (1 - cosine).mean() + smooth_l1.mean()


class WithDistillation:
    """`objective`'s loss plus the distillation terms of every teacher (see the module docstring)."""

    def __init__(self, objective, cfg: DistillationConfig, block_size: int | None = None) -> None:
        self.objective, self.cfg, self.block_size = objective, cfg, block_size
        self.teacher_weights = {teacher.name: teacher.weight for teacher in cfg.teachers}
        # The adaptor heads' outputs are not features a feature cache can replay.
        uses_heads = cfg.feature_weight > 0 or cfg.patch_weight > 0
        # The logit terms are functions of whole-batch features, which only a feature cache can split.
        self.accumulation = FEATURE_CACHE if objective.accumulation == FEATURE_CACHE and not uses_heads \
            else WHOLE_BATCH

    def __call__(self, output: ModelOutput, batch: Batch, collectives: Collectives) -> LossOutput:
        result = self.objective(output, batch, collectives)
        cfg, loss, metrics = self.cfg, result.loss, dict(result.metrics)
        for name, weight in self.teacher_weights.items():
            teacher = batch.teachers[name]
            terms = {}
            if cfg.contrastive_weight > 0:
                terms["contrastive"] = cfg.contrastive_weight * contrastive_distillation_loss(
                    output.image_features, output.text_features, output.logit_scale, teacher.image_features,
                    teacher.text_features, teacher.logit_scale, collectives, self.block_size)
            if cfg.sigmoid_weight > 0:
                terms["sigmoid"] = cfg.sigmoid_weight * sigmoid_distillation_loss(
                    output.image_features, output.text_features, output.logit_scale, output.logit_bias,
                    teacher.image_features, teacher.text_features, teacher.logit_scale, teacher.logit_bias,
                    collectives, self.block_size)
            if cfg.feature_weight > 0:
                target = standardize(teacher.image_features, collectives)
                terms["feature"] = cfg.feature_weight * feature_distillation_loss(output.adapted_features[name],
                                                                                  target)
            if cfg.patch_weight > 0:
                teacher_tokens = teacher.patch_tokens  # (B, N_t, W_t)
                grid = round(teacher_tokens.shape[1] ** 0.5)
                adapted = resize_token_grid(output.adapted_patch_tokens[name], grid)
                terms["patch"] = cfg.patch_weight * feature_distillation_loss(
                    adapted, standardize(teacher_tokens, collectives))
            for term, value in terms.items():
                loss = loss + weight * value
                metrics[f"distill/{name}/{term}"] = value.detach()
        return LossOutput(loss=loss, metrics=metrics, teacher_statistics=result.teacher_statistics)
