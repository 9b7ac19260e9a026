"""SigLIP 2's late self-distillation: the token path, the loss terms against a hand computation, the 2-rank demo
switching on at its step and resuming across it bit for bit, and a tiny run whose teacher does not collapse."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from contrastive.checkpoint_io import SHARDED_PARTS, list_checkpoints, load_checkpoint
from contrastive.config import SelfDistillationConfig
from contrastive.dist.collectives import LocalCollectives
from contrastive.encoders import load_encoder
from contrastive.losses import build_loss
from contrastive.losses.self_distillation import WithSelfDistillation
from contrastive.models import build_model
from contrastive.models.self_distillation import vit_tokens
from contrastive.train.step import build_forward_backward
from contrastive.train.trainer import Trainer
from contrastive.types import Batch, LossOutput, ModelOutput
from tests.conftest import compose_config, tiny_run_overrides, torchrun
from tests.test_accumulation import assert_same_gradients
from tests.test_checkpoint_sharded import _assert_equal

TRAIN = ["-m", "contrastive.cli.train"]


def test_the_token_path_is_the_towers_forward_and_takes_smaller_crops():
    model = build_model(compose_config(["model=tiny_siglip"]).model).eval()
    images = torch.randn(3, 3, 28, 28)
    pooled, patches = vit_tokens(model.clip.visual, images)
    torch.testing.assert_close(pooled, model.clip.visual(images))  # timm's own forward
    assert patches.shape == (3, 16, 128)
    pooled_local, patches_local = vit_tokens(model.clip.visual, torch.randn(3, 3, 14, 14))
    assert pooled_local.shape == (3, 128) and patches_local.shape == (3, 4, 128)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, :8] = True
    _, masked = vit_tokens(model.clip.visual, images, mask, torch.zeros(1, 1, 128))
    assert not torch.allclose(masked, patches)


@pytest.fixture
def one_thread():
    """Small matrices: on a shared 2-core CPU a second torch thread costs far more than it brings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _ZeroObjective:
    accumulation = "feature_cache"

    def __call__(self, output, batch, collectives) -> LossOutput:
        return LossOutput(loss=torch.zeros(()), metrics={})


def test_the_terms_equal_a_hand_computation():
    torch.manual_seed(0)
    cfg = SelfDistillationConfig(enabled=True, teacher_temp=0.04, student_temp=0.1, local_weight=1.0,
                                 masked_weight=0.25)
    batch, views, local, patches, prototypes = 2, 2, 3, 4, 5
    output = ModelOutput(
        student_local_logits=torch.randn(batch, local, prototypes), teacher_global_logits=torch.randn(batch, views,
                                                                                                     prototypes),
        student_patch_logits=torch.randn(batch, views, patches, prototypes),
        teacher_patch_logits=torch.randn(batch, views, patches, prototypes),
        patch_mask=torch.rand(batch, views, patches) < 0.5, global_centre=torch.randn(prototypes),
        patch_centre=torch.randn(prototypes))
    output.patch_mask[:, :, 0] = True  # every view has a masked patch
    result = WithSelfDistillation(_ZeroObjective(), cfg)(output, Batch(torch.zeros(batch), torch.zeros(batch)),
                                                         LocalCollectives())
    local_terms, masked_terms = [], []
    for b in range(batch):
        for g in range(views):
            target = F.softmax((output.teacher_global_logits[b, g] - output.global_centre) / 0.04, dim=0)
            for crop in range(local):
                prediction = F.softmax(output.student_local_logits[b, crop] / 0.1, dim=0)
                local_terms.append(-(target * prediction.log()).sum())
            per_patch = []
            for n in range(patches):
                if output.patch_mask[b, g, n]:
                    target = F.softmax((output.teacher_patch_logits[b, g, n] - output.patch_centre) / 0.04, dim=0)
                    prediction = F.softmax(output.student_patch_logits[b, g, n] / 0.1, dim=0)
                    per_patch.append(-(target * prediction.log()).sum())
            masked_terms.append(torch.stack(per_patch).mean())
    expected = torch.stack(local_terms).mean() + 0.25 * torch.stack(masked_terms).mean()
    torch.testing.assert_close(result.loss, expected)
    torch.testing.assert_close(result.teacher_statistics["global_centre"], output.teacher_global_logits.mean((0, 1)))
    assert 0 <= float(result.metrics["distill/teacher_entropy"]) <= math.log(prototypes)


DEMO = ["experiment=demo_siglip2", "debug=tiny", "model=tiny_siglip", "trainer.max_steps=4",
        "trainer.checkpoint_every=2", "loss.self_distillation.start=0.75", "dist.strategy=fsdp",
        "trainer.deterministic=true", "trainer.keep_last_checkpoints=10"]  # checkpoints: DCP (auto under FSDP)


@pytest.mark.distributed
def test_demo_siglip2_switches_on_at_its_step_on_two_ranks_and_resumes_across_it_bit_for_bit(demo_root, tmp_path):
    """demo_siglip2 on 2 FSDP ranks, 4 steps, start 0.75: the terms are logged at step 4 (the 4th step, index 3)
    and not before; the heads take no optimiser state before it. A run killed after its step-2 checkpoint and
    resumed across the switch ends with the uninterrupted run's weights, teacher, heads, centres, optimiser state.
    Both write sharded (DCP) checkpoints; tests/test_checkpoint_sharded.py shows those equal single files. The last
    one loads as an encoder for evaluation and export, without the training-only parts."""
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    torchrun([*TRAIN, *tiny_run_overrides(demo_root, reference_dir), *DEMO])
    logged = [json.loads(line) for line in (reference_dir / "metrics.jsonl").read_text().splitlines()]
    assert [("distill/masked_loss" in row) for row in logged] == [False] * 3 + [True]
    assert all("distill/local_loss" in row for row in logged[3:])
    reference = {step: load_checkpoint(path, sharded_parts=SHARDED_PARTS)
                 for step, path in list_checkpoints(reference_dir)}
    heads = [k for k in reference[4]["model"] if k.startswith("self_distillation.")
             and not k.startswith("self_distillation.teacher.") and "centre" not in k]
    assert heads and not set(heads) & set(reference[2]["optimizer"]["state"])
    assert set(heads) <= set(reference[4]["optimizer"]["state"])
    teacher = "self_distillation.teacher.visual.trunk.pos_embed"
    assert not torch.equal(reference[4]["model"][teacher], reference[2]["model"][teacher])
    assert reference[4]["model"]["self_distillation.global_centre"].abs().sum() > 0

    shutil.copytree(reference_dir, resumed_dir)
    for step, path in list_checkpoints(resumed_dir):  # as if killed right after the step-2 commit
        if step > 2:
            shutil.rmtree(path)
    metrics = resumed_dir / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["step"] <= 2))
    torchrun([*TRAIN, *tiny_run_overrides(demo_root, resumed_dir), *DEMO, "resume=latest"])
    for step, path in list_checkpoints(resumed_dir):
        state = load_checkpoint(path, sharded_parts=SHARDED_PARTS)
        for part in ("model", "optimizer", "data_positions", "step"):
            _assert_equal(state[part], reference[step][part], f"step {step} {part}")
    # Evaluation and export load the towers alone: heads, mask token and teacher serve training only.
    encoder = load_encoder(resumed_dir)
    assert encoder.run_config["step"] == 4 and encoder.model.self_distillation is None


# Floor for the entropy of the teacher's batch-mean distribution: a teacher collapsed onto one prototype has 0;
# 2 nats is e^2 = 7.4 prototypes in even use.
MARGINAL_ENTROPY_FLOOR = 2.0


def test_a_tiny_run_keeps_its_teacher_from_collapsing_onto_one_prototype(demo_root, tmp_path):
    """Self-distillation from the first step for 12 steps in one process: at every step the entropy of the
    teacher's batch-mean distribution over the prototypes stays above the floor, and the per-view teacher is
    sharper than uniform (its entropy below log K)."""
    cfg = compose_config(["experiment=demo_siglip2", *tiny_run_overrides(demo_root, tmp_path / "run"),
                          "model=tiny_siglip", "trainer.max_steps=12", "data.batch_size=32",
                          "loss.self_distillation.start=0", "trainer.checkpoint_every=100", "eval.at_end=false"])
    Trainer(cfg).train()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 12
    marginal = [row["distill/teacher_marginal_entropy"] for row in logged]
    assert min(marginal) > MARGINAL_ENTROPY_FLOOR, marginal
    assert all(row["distill/teacher_entropy"] < math.log(cfg.loss.self_distillation.prototypes) for row in logged)


def test_accumulated_micro_batches_equal_one_whole_batch_step_with_the_terms_on(one_thread):
    """trainer.accumulation_steps with the terms on runs the sigmoid loss's feature cache: 2 micro-batches give the
    loss, gradients (heads and mask token included) and centre statistics of one step on the whole batch. The masks
    match too: each micro-batch draws its own from the model's generator in turn, which on CPU yields the numbers
    one draw over the whole batch does."""
    cfg = compose_config(["experiment=demo_siglip2", "model=tiny_siglip", "loss.self_distillation.prototypes=64",
                          "loss.self_distillation.head_hidden=64", "loss.self_distillation.head_bottleneck=32"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss.self_distillation)
    model.self_distillation.schedule(10)
    model.self_distillation.begin_step(model.self_distillation.start_step, model.clip.visual)
    with torch.no_grad():  # a teacher apart from the student, centres away from zero
        for parameter in model.self_distillation.teacher.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
        model.self_distillation.global_centre.normal_()
    generator = torch.Generator().manual_seed(1)
    batch = Batch(images=torch.randn(8, 3, 28, 28, generator=generator),
                  tokens=torch.randint(1, 1000, (8, 16), generator=generator), keys=[str(i) for i in range(8)],
                  global_views=torch.randn(8, 2, 3, 28, 28, generator=generator),
                  local_views=torch.randn(8, 4, 3, 14, 14, generator=generator))
    objective = build_loss(cfg.loss)

    def step(steps: int, seed: int) -> tuple[LossOutput, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        model.randomness.place(torch.device("cpu"), seed)
        result = build_forward_backward(model, objective, LocalCollectives(), steps, randomness=model.randomness)(batch)
        return result, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    whole, expected = step(1, seed=3)
    accumulated, actual = step(2, seed=3)
    assert "self_distillation.mask_token" in expected and "self_distillation.patch_head.prototypes" in expected
    assert_same_gradients(actual, expected)
    torch.testing.assert_close(accumulated.loss, whole.loss)
    for name in ("distill/local_loss", "distill/masked_loss"):
        torch.testing.assert_close(accumulated.metrics[name], whole.metrics[name])
    for name, value in whole.teacher_statistics.items():
        torch.testing.assert_close(accumulated.teacher_statistics[name], value)
    _, other_masks = step(2, seed=4)  # other masks, other gradients: the comparison sees the masks
    assert not torch.allclose(other_masks["self_distillation.mask_token"], expected["self_distillation.mask_token"])
