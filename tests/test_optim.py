"""Optimiser groups (weight decay split, per-prefix lr multipliers, layer-wise lr decay per tower, frozen parameters
left out, betas passed), the implementation switch, and the step: clipping only above the limit, no update from
non-finite gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from contrastive.config import OptimConfig
from contrastive.models import build_model
from contrastive.models.locking import tower_layers
from contrastive.train.optim import build_optimizer, build_scheduler, describe, optimizer_step
from tests.conftest import compose_config


class TwoTowers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        self.text = nn.Linear(4, 2)
        self.logit_scale = nn.Parameter(torch.zeros(()))


def group_of(optimizer, parameter) -> dict:
    return next(g for g in optimizer.param_groups if any(p is parameter for p in g["params"]))


def test_lr_multipliers_longest_prefix_wins_and_decay_split_holds():
    model = TwoTowers()
    cfg = OptimConfig(lr=1.0, weight_decay=0.1, betas=[0.9, 0.95], warmup_steps=0, schedule="constant",
                      lr_multipliers={"visual.": 0.1, "visual.2.": 0.5})
    optimizer = build_optimizer(model, cfg)
    assert group_of(optimizer, model.visual[0].weight)["lr"] == pytest.approx(0.1)
    assert group_of(optimizer, model.visual[0].weight)["weight_decay"] == 0.1
    assert group_of(optimizer, model.visual[0].bias)["weight_decay"] == 0.0
    assert group_of(optimizer, model.visual[2].weight)["lr"] == pytest.approx(0.5)
    assert group_of(optimizer, model.text.weight)["lr"] == pytest.approx(1.0)
    assert group_of(optimizer, model.logit_scale)["weight_decay"] == 0.0
    assert all(g["betas"] == (0.9, 0.95) for g in optimizer.param_groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    # The schedule scales every group's own lr, so the ratios hold through warmup and decay.
    cfg.warmup_steps, cfg.schedule = 2, "cosine"
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, max_steps=10)
    for _ in range(3):
        optimizer.step()  # no gradients: only the schedule advances
        scheduler.step()
    lrs = {g["lr"] for g in optimizer.param_groups}
    top = max(lrs)
    assert 0 < top < 1.0 and {round(lr / top, 6) for lr in lrs} == {1.0, 0.5, 0.1}


def test_frozen_parameters_are_left_out():
    model = TwoTowers()
    model.visual.requires_grad_(False)
    optimizer = build_optimizer(model, OptimConfig())
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimised == {id(model.text.weight), id(model.text.bias), id(model.logit_scale)}


def test_prefix_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match=r"optim.lr_multipliers prefix\(es\) \['vision.'\] match no parameter"):
        build_optimizer(TwoTowers(), OptimConfig(lr_multipliers={"vision.": 0.1}))


def test_config_accepts_multipliers_and_rejects_non_positive_ones(demo_root):
    from omegaconf import OmegaConf

    from contrastive.config import validate
    from contrastive.losses import list_losses
    from contrastive.models import list_models

    overrides = ["model=test_tiny", "debug=tiny", f"data.sources.0.shards={demo_root / 'train'}",
                 "optim.betas=[0.9,0.95]"]
    cfg = OmegaConf.to_object(compose_config([*overrides, "++optim.lr_multipliers={clip.visual.:0.1}"]))
    validate(cfg, model_archs=list_models(), loss_names=list_losses())
    assert cfg.optim.lr_multipliers == {"clip.visual.": 0.1} and cfg.optim.betas == [0.9, 0.95]
    cfg = OmegaConf.to_object(compose_config([*overrides, "++optim.lr_multipliers={clip.visual.:0}"]))
    with pytest.raises(ValueError, match="must be positive"):
        validate(cfg, model_archs=list_models(), loss_names=list_losses())


@pytest.mark.parametrize("implementation, fused, foreach", [("auto", True, None), ("fused", True, None),
                                                           ("foreach", None, True), ("for_loop", None, False)])
def test_implementation_reaches_the_optimiser(implementation, fused, foreach):
    optimizer = build_optimizer(TwoTowers(), OptimConfig(implementation=implementation))
    assert optimizer.defaults["fused"] == fused and optimizer.defaults["foreach"] == foreach


def test_auto_leaves_optimisers_without_a_fused_kernel_alone():
    optimizer = build_optimizer(TwoTowers(), OptimConfig(optimizer="torch.optim.Adamax"))
    assert "fused" not in optimizer.defaults


def test_fused_on_an_optimiser_without_it_is_a_clear_error():
    with pytest.raises(ValueError, match="torch.optim.Adamax rejected its arguments"):
        build_optimizer(TwoTowers(), OptimConfig(optimizer="torch.optim.Adamax", implementation="fused"))


def test_optimiser_without_betas_builds_and_refuses_betas_that_would_do_nothing():
    sgd = build_optimizer(TwoTowers(), OptimConfig(optimizer="torch.optim.SGD", lr=0.5, extra_kwargs={"momentum": 0.8}))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.8 and "betas" not in sgd.defaults and "eps" not in sgd.defaults
    adamw = build_optimizer(TwoTowers(), OptimConfig(betas=[0.8, 0.9], eps=1e-5))
    assert adamw.defaults["betas"] == (0.8, 0.9) and adamw.defaults["eps"] == 1e-5
    with pytest.raises(ValueError, match=r"optim.betas=\[0.5, 0.6\] does nothing: torch.optim.SGD takes no betas"):
        build_optimizer(TwoTowers(), OptimConfig(optimizer="torch.optim.SGD", betas=[0.5, 0.6]))
    with pytest.raises(ValueError, match="optim.eps=0.001 does nothing"):
        build_optimizer(TwoTowers(), OptimConfig(optimizer="torch.optim.SGD", eps=1e-3))


def _with_gradients(model: nn.Module, value: float) -> list[nn.Parameter]:
    parameters = list(model.parameters())
    for parameter in parameters:
        parameter.grad = torch.full_like(parameter, value)
    return parameters


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel-clips", "clipped-before-the-step"])
def test_step_clips_only_above_the_limit_and_clears_gradients(fused):
    torch.manual_seed(0)
    model = TwoTowers()
    count = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, fused=fused)
    before = [p.detach().clone() for p in model.parameters()]
    norm, stepped = optimizer_step(_with_gradients(model, 1.0), optimizer, max_grad_norm=count ** 0.5 / 2)
    assert stepped and norm.item() == pytest.approx(count ** 0.5)
    for old, new in zip(before, model.parameters()):  # SGD with lr 1: the update is the clipped gradient, 1/2 each
        torch.testing.assert_close(old - new.detach(), torch.full_like(old, 0.5), rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer_step(_with_gradients(model, 0.01), optimizer, max_grad_norm=count ** 0.5 / 2)
    for old, new in zip(before, model.parameters()):  # below the limit: unscaled
        torch.testing.assert_close(old - new.detach(), torch.full_like(old, 0.01), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_step_with_non_finite_gradients_leaves_weights_and_optimiser_state_alone(bad, implementation):
    model = TwoTowers()
    optimizer = build_optimizer(model, OptimConfig(implementation=implementation))
    before = [p.detach().clone() for p in model.parameters()]
    parameters = _with_gradients(model, 0.1)
    parameters[-1].grad.view(-1)[0] = bad
    norm, stepped = optimizer_step(parameters, optimizer, max_grad_norm=1.0)
    assert not stepped and not torch.isfinite(norm)
    assert all(torch.equal(old, new) for old, new in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    # The fused kernel creates the state it skips: it must be that of an optimiser that never stepped.
    for state in optimizer.state.values():
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    # The next finite step is the first one: AdamW's first update is lr * sign(gradient), bias correction included.
    parameters = _with_gradients(model, 0.1)
    optimizer_step(parameters, optimizer, max_grad_norm=None)
    for old, new in zip(before, model.parameters()):
        decayed = old * (1 - optimizer.defaults["lr"] * group_of(optimizer, new)["weight_decay"])
        torch.testing.assert_close(decayed - new.detach(), torch.full_like(old, optimizer.defaults["lr"]),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("schedule, expected", [
    # warmup (s + 1) / 4 for s < 4, then from 1 down to min_lr_ratio 0.1 at step 14, by hand:
    # cosine at progress 0.2 = 0.1 + 0.9 * (1 + cos(0.2 pi)) / 2 = 0.91405765; linear = 0.1 + 0.9 * 0.8 = 0.82
    ("cosine", {0: 0.25, 3: 1.0, 4: 1.0, 6: 0.91405765, 9: 0.55, 14: 0.1, 20: 0.1}),
    ("linear", {0: 0.25, 3: 1.0, 4: 1.0, 6: 0.82, 9: 0.55, 14: 0.1, 20: 0.1}),
    ("constant", {0: 0.25, 3: 1.0, 4: 1.0, 6: 1.0, 9: 1.0, 14: 1.0, 20: 1.0}),
])
def test_learning_rate_schedule_values(schedule, expected):
    cfg = OptimConfig(lr=0.5, warmup_steps=4, schedule=schedule, min_lr_ratio=0.1, lr_multipliers={"text.": 0.1})
    model = TwoTowers()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, max_steps=14)
    seen = {}
    for step in range(21):
        seen[step] = sorted({group["lr"] for group in optimizer.param_groups})  # decay and no-decay groups alike
        optimizer.step()
        scheduler.step()
    for step, multiplier in expected.items():
        assert seen[step] == pytest.approx([0.05 * multiplier, 0.5 * multiplier], rel=1e-7), (step, seen[step])


def test_layer_decay_per_tower_composes_with_prefix_multipliers():
    """Every group's lr against decay**(L - i) per block, decay**(L + 1) for the embeddings, 1 for the head and
    the temperature, times the longest-prefix multiplier (test_tiny: L = 1 block per tower)."""
    image_decay, text_decay = 0.5, 0.8
    model = build_model(compose_config(["model=test_tiny"]).model)
    cfg = OptimConfig(lr=1.0, lr_multipliers={"clip.visual.": 0.1, "clip.visual.proj": 3.0})
    cfg.layer_decay.image, cfg.layer_decay.text = image_decay, text_decay
    optimizer = build_optimizer(model, cfg)
    embeddings = {"class_embedding", "positional_embedding", "conv1", "ln_pre", "token_embedding"}
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        if name.startswith("clip.visual."):
            decay, prefix = image_decay, (3.0 if name == "clip.visual.proj" else 0.1)
        elif name.startswith("clip.logit_"):
            decay, prefix = 1.0, 1.0
        else:
            decay, prefix = text_decay, 1.0
        if "resblocks" in parts:  # block 0 of 1
            exponent = 1 - int(parts[parts.index("resblocks") + 1])
        elif set(parts) & embeddings:
            exponent = 2
        else:  # ln_post, proj, ln_final, text_projection
            exponent = 0
        assert group_of(optimizer, parameter)["lr"] == pytest.approx(prefix * decay ** exponent), name
    assert {round(g["lr"], 6) for g in optimizer.param_groups} >= {0.1 * 0.25, 0.1 * 0.5, 0.1, 3.0, 0.64, 0.8, 1.0}
    assert "lr x0.025" in describe(model, cfg, max_steps=10)


def test_layer_decay_finds_timm_blocks_and_leaves_its_patch_embedding_before_them():
    model = build_model(compose_config(["model=timm_vit_tiny"]).model)
    depth, layers = tower_layers(model, "image")
    assert depth == 12
    assert layers["clip.visual.trunk.blocks.0.attn.qkv.weight"] == 1
    assert layers["clip.visual.trunk.blocks.11.mlp.fc2.weight"] == 12
    assert layers["clip.visual.trunk.patch_embed.proj.weight"] == layers["clip.visual.trunk.cls_token"] == 0
    assert layers["clip.visual.trunk.norm.weight"] == layers["clip.visual.head.proj.weight"] == 13
    text_depth, text_layers = tower_layers(model, "text")  # its root holds the image blocks too
    assert text_depth == 4 and text_layers["clip.transformer.resblocks.3.attn.in_proj_weight"] == 4


@pytest.mark.parametrize("decay", [0.0, 1.5, -0.1])
def test_layer_decay_outside_zero_one_is_refused(demo_root, decay):
    from omegaconf import OmegaConf

    from contrastive.config import validate
    from contrastive.losses import list_losses
    from contrastive.models import list_models

    overrides = ["model=test_tiny", "debug=tiny", f"data.sources.0.shards={demo_root / 'train'}"]
    cfg = OmegaConf.to_object(compose_config([*overrides, f"optim.layer_decay.text={decay}"]))
    with pytest.raises(ValueError, match=r"optim.layer_decay.text must be in \(0, 1\] or null"):
        validate(cfg, model_archs=list_models(), loss_names=list_losses())
    cfg = OmegaConf.to_object(compose_config([*overrides, "optim.layer_decay.image=1.0"]))
    validate(cfg, model_archs=list_models(), loss_names=list_losses())
