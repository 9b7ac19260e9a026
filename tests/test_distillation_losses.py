"""Distillation losses against direct formulas (torch's kl_div, per-pair loops, F.interpolate), for values and
gradients, materialised and blockwise. Their parity across torchrun ranks (1-4, gloo) with the one-process loss
runs in the same launch as the other losses' (tests/test_losses.py, tests/dist_scripts/distillation_parity.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from contrastive.config import DistillationConfig, LossConfig, TeacherConfig
from contrastive.dist import LocalCollectives
from contrastive.losses import build_loss
from contrastive.losses.distillation import (
    contrastive_distillation_loss,
    feature_distillation_loss,
    resize_token_grid,
    sigmoid_distillation_loss,
    standardize,
)
from contrastive.types import Batch, ModelOutput, TeacherTargets

BLOCK_SIZES = [None, 1, 4, 64]  # 4 does not divide the batch of 9


def _unit(generator, *shape):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1).float()


def _features(seed: int = 0, batch: int = 9):
    generator = torch.Generator().manual_seed(seed)
    return (_unit(generator, batch, 8), _unit(generator, batch, 8), _unit(generator, batch, 12),
            _unit(generator, batch, 12))


def _expected_contrastive_kl(images, texts, scale, teacher_images, teacher_texts, teacher_scale):
    """torch's kl_div on the materialised softmaxes, both directions."""
    def kl(student_logits, teacher_logits):
        return F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1), log_target=True,
                        reduction="batchmean")

    student, teacher = scale * images @ texts.T, teacher_scale * teacher_images @ teacher_texts.T
    return (kl(student, teacher) + kl(student.T, teacher.T)) / 2


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_contrastive_distillation_equals_kl_div_with_gradients(block_size):
    images, texts, teacher_images, teacher_texts = _features(1)
    ours = [t.clone().requires_grad_(True) for t in (images, texts, torch.tensor(7.0))]
    theirs = [t.clone().requires_grad_(True) for t in (images, texts, torch.tensor(7.0))]
    loss = contrastive_distillation_loss(*ours, teacher_images, teacher_texts, torch.tensor(30.0),
                                         LocalCollectives(), block_size)
    expected = _expected_contrastive_kl(*theirs, teacher_images, teacher_texts, torch.tensor(30.0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    expected.backward()
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-5, atol=1e-7)


def test_contrastive_distillation_is_zero_when_the_student_is_the_teacher():
    images, texts, _, _ = _features(2)
    loss = contrastive_distillation_loss(images, texts, torch.tensor(9.0), images, texts, torch.tensor(9.0),
                                         LocalCollectives(), block_size=4)
    assert abs(loss.item()) < 1e-5


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_sigmoid_distillation_equals_per_pair_binary_kl(block_size):
    images, texts, teacher_images, teacher_texts = _features(3, batch=6)
    scale, bias, teacher_scale, teacher_bias = 10.0, -4.0, 15.0, -6.0
    expected = 0.0
    for i in range(6):  # sum over pairs of q log(q/p) + (1-q) log((1-q)/(1-p)), over the batch
        for j in range(6):
            q = torch.sigmoid(teacher_scale * teacher_images[i] @ teacher_texts[j] + teacher_bias).double()
            p = torch.sigmoid(scale * images[i] @ texts[j] + bias).double()
            expected += (q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))).item()
    ours = [t.clone().requires_grad_(True) for t in (images, texts, torch.tensor(scale), torch.tensor(bias))]
    loss = sigmoid_distillation_loss(*ours, teacher_images, teacher_texts, torch.tensor(teacher_scale),
                                     torch.tensor(teacher_bias), LocalCollectives(), block_size)
    assert loss.item() == pytest.approx(expected / 6, rel=1e-5)
    # gradients against autograd through torch's binary cross-entropy on the materialised pairs
    theirs = [t.clone().requires_grad_(True) for t in (images, texts, torch.tensor(scale), torch.tensor(bias))]
    targets = torch.sigmoid(teacher_scale * teacher_images @ teacher_texts.T + teacher_bias)
    reference = F.binary_cross_entropy_with_logits(theirs[2] * theirs[0] @ theirs[1].T + theirs[3], targets,
                                                   reduction="sum") / 6
    loss.backward()
    reference.backward()
    for mine, other in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, other.grad, rtol=1e-5, atol=1e-6)


def test_feature_loss_is_one_minus_cosine_plus_smooth_l1_by_hand():
    adapted = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    target = torch.tensor([[0.0, 2.0], [0.0, 1.5]])
    # row 0: cosine 0, smooth-L1 (|1|-0.5 + |2|-0.5)/2 = 1.0; row 1: cosine 1, smooth-L1 (0 + (1.5-0.5))/2 = 0.5
    expected = ((1 - 0) + (1 - 1)) / 2 + (1.0 + 0.5) / 2
    assert feature_distillation_loss(adapted, target).item() == pytest.approx(expected)


def test_standardized_targets_have_zero_mean_and_unit_mean_variance():
    features = torch.randn(64, 10) * torch.linspace(0.5, 4.0, 10) + 3.0
    standardized = standardize(features, LocalCollectives())
    torch.testing.assert_close(standardized.mean(0), torch.zeros(10), atol=1e-5, rtol=0)
    assert standardized.var(0, unbiased=False).mean().item() == pytest.approx(1.0, rel=1e-5)


def test_token_grids_are_resized_as_images_are():
    tokens = torch.randn(2, 4, 5)  # a 2 x 2 grid of width 5
    resized = resize_token_grid(tokens, 3)
    planes = tokens.view(2, 2, 2, 5).permute(0, 3, 1, 2)
    expected = F.interpolate(planes, size=(3, 3), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(resized, expected.reshape(2, 9, 5))
    assert resize_token_grid(tokens, 2) is tokens


def test_terms_add_to_the_objective_weighted_per_teacher():
    images, texts, teacher_images, teacher_texts = _features(5)
    cfg = DistillationConfig(teachers=[TeacherConfig(name="t", path="unused", weight=0.25)], contrastive_weight=2.0)
    objective = build_loss(LossConfig(name="clip", distillation=cfg))
    output = ModelOutput(image_features=images, text_features=texts, logit_scale=torch.tensor(7.0))
    batch = Batch(images=torch.empty(9, 0), tokens=torch.empty(9, 0, dtype=torch.long), teachers={
        "t": TeacherTargets(teacher_images, teacher_texts, torch.tensor(30.0))})
    result = objective(output, batch, LocalCollectives())
    plain = build_loss(LossConfig(name="clip"))(output, batch, LocalCollectives()).loss
    kl = _expected_contrastive_kl(images, texts, torch.tensor(7.0), teacher_images, teacher_texts,
                                  torch.tensor(30.0))
    assert result.loss.item() == pytest.approx((plain + 0.25 * 2.0 * kl).item(), rel=1e-5)
    assert result.metrics["distill/t/contrastive"].item() == pytest.approx(2.0 * kl.item(), rel=1e-5)


def test_feature_cache_with_the_contrastive_term_matches_the_full_batch():
    """Logit-only distillation keeps the student objective's feature cache: 4 micro-batches give the full batch's
    gradients (the teacher's targets travel whole with the batch)."""
    from contrastive.train.step import FeatureCache, build_forward_backward
    from tests.test_accumulation import assert_same_gradients, gradients, random_batch, tiny_model

    model, batch = tiny_model("clip"), random_batch(8)
    _, _, teacher_images, teacher_texts = _features(7, batch=8)
    batch.teachers = {"t": TeacherTargets(teacher_images, teacher_texts, torch.tensor(30.0))}
    cfg = DistillationConfig(teachers=[TeacherConfig(name="t", path="unused")], contrastive_weight=1.0)
    objective = build_loss(LossConfig(name="clip", distillation=cfg))
    objective(model(batch.images, batch.tokens), batch, LocalCollectives()).loss.backward()
    expected = gradients(model)
    model.zero_grad(set_to_none=True)
    step = build_forward_backward(model, objective, LocalCollectives(), steps=4, randomness=model.randomness)
    assert isinstance(step, FeatureCache)
    step(batch)
    assert_same_gradients(gradients(model), expected)
