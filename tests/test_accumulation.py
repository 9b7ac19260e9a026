"""Gradient accumulation: K micro-batches give the gradients of one batch K times larger, negatives included.

Run as a script under torchrun (see test_ddp_step_matches_full_batch_under_torchrun), it checks the same on 2 ranks
with DDP, for the default step (K = 1) and the feature cache (K = 2), for clip, siglip and siglip_locca (whose decoder
term each micro-batch adds in pass 2): every rank's reduced gradients equal one process's gradients on the whole
global batch.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from contrastive.config import LossConfig, ModelConfig
from contrastive.dist.collectives import LocalCollectives
from contrastive.losses import LOSSES, build_loss, list_losses
from contrastive.losses.registry import FEATURE_CACHE, FEATURE_CACHE_AND_PER_EXAMPLE_MEAN, PER_EXAMPLE_MEAN, WHOLE_BATCH
from contrastive.models import build_model
from contrastive.models.randomness import ModelRandomness
from contrastive.train.step import FeatureCache, SummedMicroBatches, batch_rows, build_forward_backward
from contrastive.types import Batch

VISION = dict(image_size=28, patch_size=7, width=32, layers=2, head_width=16, mlp_ratio=2.0)
TEXT = dict(context_length=12, vocab_size=100, width=32, heads=2, layers=2, mlp_ratio=2.0)


def tiny_model(loss: str, seed: int = 0, **vision) -> torch.nn.Module:
    torch.manual_seed(seed)
    bias = -10.0 if loss == "siglip" else None
    return build_model(ModelConfig(arch="clip", embed_dim=16, vision={**VISION, **vision}, text=TEXT,
                                   init_logit_bias=bias))


def random_batch(size: int, seed: int = 1) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 100, (size, 12), generator=generator)
    tokens[:, 8:] = 0  # padding
    return Batch(images=torch.randn(size, 3, 28, 28, generator=generator), tokens=tokens,
                 keys=[str(i) for i in range(size)])


def tiny_locca(seed: int = 0) -> tuple[torch.nn.Module, object]:
    """model=tiny_siglip_locca (a timm SigLIP tower of 64 patches, CapPa's decoder) with a 500-token vocabulary."""
    from tests.conftest import compose_config

    cfg = compose_config(["model=tiny_siglip_locca", "loss=siglip_locca", "model.text.vocab_size=500",
                          "model.text.context_length=12"])
    torch.manual_seed(seed)
    return build_model(cfg.model), build_loss(cfg.loss)


def locca_batch(size: int, seed: int = 1) -> Batch:
    """Random captions and decoder texts whose prompts (1-4 tokens) and targets (padding from 5 to 11 tokens on)
    differ in length, so a token count over the batch would weigh the examples differently from per-example means;
    random tasks, every one drawn."""
    generator = torch.Generator().manual_seed(seed)
    decoder_tokens = torch.randint(1, 500, (size, 12), generator=generator)
    ends = torch.randint(5, 12, (size,), generator=generator)
    decoder_tokens[torch.arange(12)[None] >= ends[:, None]] = 0
    tasks = torch.randint(0, 3, (size,), generator=generator)
    tasks[:3] = torch.arange(3)
    prompt_lengths = torch.randint(1, 5, (size,), generator=generator)
    return Batch(images=torch.randn(size, 3, 64, 64, generator=generator),
                 tokens=torch.randint(1, 500, (size, 12), generator=generator), keys=[str(i) for i in range(size)],
                 decoder_tokens=decoder_tokens, decoder_prompt_lengths=prompt_lengths, decoder_tasks=tasks)


def locca_full_batch(model, objective, batch: Batch, collectives=None):
    """One forward and backward of loss=siglip_locca on the whole batch: (its LossOutput, every gradient)."""
    model.zero_grad(set_to_none=True)
    output = model(batch.images, batch.tokens, decoder_tokens=batch.decoder_tokens,
                   decoder_prompt_lengths=batch.decoder_prompt_lengths)
    result = objective(output, batch, collectives or LocalCollectives())
    result.loss.backward()
    return result, gradients(model)


def full_batch_gradients(model, loss: str, batch: Batch, collectives=None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    result = build_loss(LossConfig(name=loss))(model(batch.images, batch.tokens), batch,
                                               collectives or LocalCollectives())
    result.loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_gradients(actual: dict, expected: dict) -> None:
    """Equal to fp32 precision: an element may differ by 1e-5 of its tensor's largest gradient. Summing in another
    order moves fp32 gradients that much (both of them are ~5e-6 of the scale off a float64 computation), where a
    wrong gradient (a missing negative, a rank's share counted twice) is off by percents."""
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_feature_cache_matches_full_batch(loss):
    model, batch = tiny_model(loss), random_batch(8)
    expected = full_batch_gradients(model, loss, batch)
    model.zero_grad(set_to_none=True)
    step = build_forward_backward(model, build_loss(LossConfig(name=loss)), LocalCollectives(), steps=4,
                                  randomness=model.randomness)
    assert isinstance(step, FeatureCache)
    result = step(batch)
    assert_same_gradients(gradients(model), expected)
    assert expected["clip.logit_scale"].abs() > 0  # the temperature's gradient is compared, not trivially zero
    reference_loss = build_loss(LossConfig(name=loss))(model(batch.images, batch.tokens), batch,
                                                       LocalCollectives()).loss
    torch.testing.assert_close(result.loss, reference_loss.detach())


def test_feature_cache_replays_patch_dropout_randomness():
    """Pass 2 draws the same patch-dropout masks as pass 1: the gradients equal keeping every micro-batch's graph."""
    model, batch = tiny_model("clip", patch_dropout=0.5), random_batch(8)
    objective = build_loss(LossConfig(name="clip"))
    cpu = torch.device("cpu")
    model.randomness.place(cpu, 3)
    outputs = [model(batch.images[rows], batch.tokens[rows]) for rows in (slice(0, 4), slice(4, 8))]
    after_both = model.randomness.generator.get_state()
    joined = copy.copy(outputs[0])
    joined.image_features = torch.cat([o.image_features for o in outputs])
    joined.text_features = torch.cat([o.text_features for o in outputs])
    objective(joined, batch, LocalCollectives()).loss.backward()
    expected = gradients(model)
    model.zero_grad(set_to_none=True)
    model.randomness.place(cpu, 3)
    FeatureCache(model, objective, LocalCollectives(), steps=2, randomness=model.randomness)(batch)
    assert_same_gradients(gradients(model), expected)
    assert torch.equal(model.randomness.generator.get_state(), after_both), "the next step draws what it would"
    model.zero_grad(set_to_none=True)
    model.randomness.place(cpu, 4)  # other masks, other gradients: the comparison above is not blind to randomness
    FeatureCache(model, objective, LocalCollectives(), steps=2, randomness=model.randomness)(batch)
    assert not torch.allclose(gradients(model)["clip.visual.conv1.weight"], expected["clip.visual.conv1.weight"])


@pytest.fixture
def one_thread():
    """Tiny matrices: on a shared 2-core machine a second thread mostly waits (this test: 44 s with two, 6 s with one,
    measured under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_feature_cache_matches_full_batch_for_siglip_locca(one_thread):
    """The sigmoid term on the cached features plus each micro-batch's decoder term: with 2 and with 4 micro-batches
    the loss, each logged term and every gradient (decoder, both towers, scale and bias) equal one step on the whole
    batch."""
    model, objective = tiny_locca()
    batch = locca_batch(8)
    expected, expected_grads = locca_full_batch(model, objective, batch)
    for name in ("decoder.head.weight", "clip.logit_scale", "clip.logit_bias"):
        assert expected_grads[name].abs().max() > 0, name  # compared, not trivially zero
    for steps in (2, 4):
        model.zero_grad(set_to_none=True)
        step = build_forward_backward(model, objective, LocalCollectives(), steps=steps, randomness=model.randomness)
        assert isinstance(step, FeatureCache)
        result = step(batch)
        assert_same_gradients(gradients(model), expected_grads)
        torch.testing.assert_close(result.loss, expected.loss.detach())
        assert result.metrics.keys() == expected.metrics.keys()
        for name, value in expected.metrics.items():
            torch.testing.assert_close(result.metrics[name], value,
                                       msg=lambda m, name=name, steps=steps: f"K={steps} {name}: {m}")


def test_summed_micro_batches_match_full_batch_for_cappa():
    torch.manual_seed(0)
    decoder = dict(width=32, layers=1, heads=2, mlp_ratio=2.0, parallel_prob=1.0)  # no random draw per example
    model = build_model(ModelConfig(arch="cappa", embed_dim=32, vision={**VISION, "pool_type": "avg"},
                                    text=dict(context_length=12, vocab_size=100), decoder=decoder))
    batch = random_batch(8)
    expected = full_batch_gradients(model, "cappa", batch)
    model.zero_grad(set_to_none=True)
    step = build_forward_backward(model, build_loss(LossConfig(name="cappa")), LocalCollectives(), steps=4,
                                  randomness=model.randomness)
    assert isinstance(step, SummedMicroBatches)
    step(batch)
    assert_same_gradients(gradients(model), expected)


def test_unsupported_objective_is_refused():
    with pytest.raises(ValueError, match="accumulation_steps=2 is not supported with CoCaLoss "
                                         ".accumulation='whole_batch'.: a feature cache fits loss=clip.siglip "
                                         "and summed micro-batches fit loss=cappa .both at once: "
                                         "loss=siglip_locca.; use"):
        build_forward_backward(torch.nn.Linear(1, 1), build_loss(LossConfig(name="coca")), LocalCollectives(), steps=2,
                               randomness=ModelRandomness())


def test_the_objectives_declared_accumulation_picks_the_step():
    """A loss registered under any name is micro-batched as it declares: a new objective needs no edit here."""
    clip = build_loss(LossConfig(name="clip"))

    class ScaledClip:
        accumulation = PER_EXAMPLE_MEAN  # declared, whatever the maths: the declaration alone decides

        def __call__(self, output, batch, collectives):
            return clip(output, batch, collectives)

    model = tiny_model("clip")
    step = build_forward_backward(model, ScaledClip(), LocalCollectives(), steps=2, randomness=model.randomness)
    assert isinstance(step, SummedMicroBatches)
    ScaledClip.accumulation = FEATURE_CACHE
    step = build_forward_backward(model, ScaledClip(), LocalCollectives(), steps=2, randomness=model.randomness)
    assert isinstance(step, FeatureCache)
    assert {name: LOSSES.get(name).accumulation for name in list_losses()} == {
        "clip": FEATURE_CACHE, "siglip": FEATURE_CACHE, "cappa": PER_EXAMPLE_MEAN, "coca": WHOLE_BATCH,
        "siglip_locca": FEATURE_CACHE_AND_PER_EXAMPLE_MEAN}


def test_micro_batches_must_divide_the_local_batch():
    model = tiny_model("clip")
    with pytest.raises(ValueError, match="not divisible by trainer.accumulation_steps=3"):
        FeatureCache(model, build_loss(LossConfig(name="clip")), LocalCollectives(), steps=3,
                     randomness=model.randomness)(random_batch(8))


@pytest.mark.slow
def test_training_with_accumulation_follows_the_same_losses(demo_root, tmp_path):
    """The trainer with 4 micro-batches per step takes the steps of the trainer with whole batches."""
    import json

    from omegaconf import OmegaConf

    from contrastive.train.trainer import Trainer
    from tests.conftest import compose_config, tiny_run_overrides

    losses = {}
    for steps in (1, 4):
        run_dir = tmp_path / f"k{steps}"
        cfg = compose_config([*tiny_run_overrides(demo_root, run_dir), f"trainer.accumulation_steps={steps}"])
        Trainer(OmegaConf.to_object(cfg)).train()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[steps] = [row["loss"] for row in rows if "loss" in row]
    assert len(losses[1]) == 4
    torch.testing.assert_close(losses[4], losses[1], rtol=1e-4, atol=1e-5)


@pytest.mark.distributed
def test_ddp_step_matches_full_batch_under_torchrun():
    from tests.conftest import torchrun

    result = torchrun([str(Path(__file__).resolve())], nproc=2)
    # 2 ranks x (clip, siglip, siglip_locca) x (K = 1, K = 2); the ranks' lines may interleave
    assert result.stdout.count("same gradients") == 12, result.stdout
    assert result.stdout.count("K=1: same gradients") == 6, result.stdout
    assert result.stdout.count("siglip_locca K=2: same gradients and loss") == 2, result.stdout


def _distributed_check() -> None:
    """Each rank: the trainer's DDP wrap and step (K = 1, then the feature cache with K = 2) on its half of a global
    batch of 8, vs one process (no process group) on all 8, starting from the same weights."""
    from contrastive.dist import init_distributed
    from contrastive.dist.parallel import parallelize

    env = init_distributed("cpu", "gloo")
    torch.set_num_threads(1)
    global_batch = random_batch(8)
    local = batch_rows(global_batch, slice(env.rank * 4, (env.rank + 1) * 4))
    for loss in ("clip", "siglip"):
        for steps in (1, 2):
            model = tiny_model(loss, seed=env.rank)  # DDP starts every rank from rank 0's weights
            reference = tiny_model(loss, seed=0)
            expected = full_batch_gradients(reference, loss, global_batch)
            step = build_forward_backward(parallelize(model, env), build_loss(LossConfig(name=loss)),
                                          env.collectives, steps=steps, randomness=model.randomness)
            step(local)
            # DDP averages over ranks and each rank's loss is its rows' share, so the global loss is the rank mean.
            assert_same_gradients(gradients(model), expected)
            print(f"rank {env.rank} {loss} K={steps}: same gradients", flush=True)
    global_batch = locca_batch(8)
    local = batch_rows(global_batch, slice(env.rank * 4, (env.rank + 1) * 4))
    for steps in (1, 2):
        model, objective = tiny_locca(seed=env.rank)
        reference, _ = tiny_locca(seed=0)
        expected, expected_grads = locca_full_batch(reference, objective, global_batch)
        step = build_forward_backward(parallelize(model, env), objective, env.collectives, steps=steps,
                                      randomness=model.randomness)
        result = step(local)
        assert_same_gradients(gradients(model), expected_grads)
        torch.testing.assert_close(env.collectives.all_reduce_mean(result.loss), expected.loss.detach())
        print(f"rank {env.rank} siglip_locca K={steps}: same gradients and loss", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _distributed_check()
