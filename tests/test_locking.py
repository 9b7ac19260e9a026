"""Locked towers (LiT): frozen parameters stay put and leave the optimiser; towers load from our checkpoints."""

from __future__ import annotations

import pytest
import torch

from contrastive.config import LockConfig, LossConfig, ModelConfig, OptimConfig, TowerLockConfig
from contrastive.dist.collectives import LocalCollectives
from contrastive.losses import build_loss
from contrastive.models import build_model
from contrastive.models.locking import apply_locks, load_tower, tower_parameter_names
from contrastive.train.optim import build_optimizer
from contrastive.types import Batch

VISION = dict(image_size=28, patch_size=7, width=32, layers=2, head_width=16, mlp_ratio=2.0)
TEXT = dict(context_length=12, vocab_size=100, width=32, heads=2, layers=2, mlp_ratio=2.0)


def tiny_clip(seed: int = 0, width: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch="clip", embed_dim=16, vision={**VISION, "width": width}, text=TEXT))


def train_steps(model, steps: int = 2) -> None:
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    objective = build_loss(LossConfig(name="clip"))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = Batch(images=torch.randn(4, 3, 28, 28, generator=generator),
                      tokens=torch.randint(1, 100, (4, 12), generator=generator))
        objective(model(batch.images, batch.tokens), batch, LocalCollectives()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_locked_image_tower_does_not_change_and_is_not_optimised():
    model = tiny_clip()
    apply_locks(model, LockConfig(image=TowerLockConfig(locked=True)))
    image = set(tower_parameter_names(model, "image"))
    assert image and all(name.startswith("clip.visual.") for name in image)
    assert trainable(model) == {name for name, _ in model.named_parameters()} - image
    optimised = {id(p) for group in build_optimizer(model, OptimConfig()).param_groups for p in group["params"]}
    parameters = dict(model.named_parameters())
    assert not optimised & {id(parameters[name]) for name in image}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_steps(model)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], before[name]) for name in image)
    assert not torch.equal(after["clip.text_projection"], before["clip.text_projection"])


def test_last_blocks_head_and_norms_can_stay_unlocked():
    model = tiny_clip()
    apply_locks(model, LockConfig(image=TowerLockConfig(locked=True, unlocked_blocks=1)))
    image_trainable = {n.removeprefix("clip.visual.") for n in trainable(model) if n.startswith("clip.visual.")}
    assert all(n.startswith("transformer.resblocks.1.") or n in {"ln_post.weight", "ln_post.bias", "proj"}
               for n in image_trainable)
    assert {"proj", "ln_post.weight", "transformer.resblocks.1.mlp.c_fc.weight"} <= image_trainable

    model = tiny_clip()
    apply_locks(model, LockConfig(text=TowerLockConfig(locked=True, unlocked_norms=True)))
    text_trainable = trainable(model) & set(tower_parameter_names(model, "text"))
    assert text_trainable and all(".ln_" in n or n.startswith("clip.ln_final") for n in text_trainable)
    assert "clip.logit_scale" in trainable(model) and "clip.visual.proj" in trainable(model)

    with pytest.raises(ValueError, match="unlocked_blocks=3 but the tower has 2 blocks"):
        apply_locks(tiny_clip(), LockConfig(image=TowerLockConfig(locked=True, unlocked_blocks=3)))
    with pytest.raises(ValueError, match="need lock.image.locked=true"):
        apply_locks(tiny_clip(), LockConfig(image=TowerLockConfig(unlocked_blocks=1)))


def save_ours(model, path) -> None:
    torch.save({"model": model.state_dict(), "config": {"model": {"vision": VISION}}}, path)


def test_tower_loads_from_our_checkpoint(tmp_path):
    source, target = tiny_clip(seed=1), tiny_clip(seed=2)
    save_ours(source, tmp_path / "source.pt")
    text_before = target.clip.token_embedding.weight.detach().clone()
    apply_locks(target, LockConfig(image=TowerLockConfig(locked=True, checkpoint=str(tmp_path / "source.pt"))))
    for name, parameter in source.visual.named_parameters():
        assert torch.equal(dict(target.visual.named_parameters())[name], parameter)
    assert torch.equal(target.clip.token_embedding.weight, text_before)  # the text tower kept its own weights
    assert not torch.equal(target.clip.token_embedding.weight, source.clip.token_embedding.weight)

    load_tower(target, "text", str(tmp_path / "source.pt"))
    assert torch.equal(target.clip.token_embedding.weight, source.clip.token_embedding.weight)


def test_tower_of_another_architecture_is_refused(tmp_path):
    save_ours(tiny_clip(width=64), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="does not match this model's image tower: 0 missing and .* mismatched"):
        load_tower(tiny_clip(), "image", str(tmp_path / "wide.pt"))


def test_model_without_text_tower_is_refused():
    cappa = build_model(ModelConfig(arch="cappa", embed_dim=32, vision={**VISION, "pool_type": "avg"},
                                    text=dict(context_length=12, vocab_size=100),
                                    decoder=dict(width=32, layers=1, heads=2)))
    with pytest.raises(ValueError, match="has no text tower"):
        apply_locks(cappa, LockConfig(text=TowerLockConfig(locked=True)))
    apply_locks(cappa, LockConfig(image=TowerLockConfig(locked=True)))
    assert not any(p.requires_grad for p in cappa.visual.parameters())
