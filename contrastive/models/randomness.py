"""The model's own random generator, the patch dropout that draws from it, and the RNG states a training step uses.

Patch dropout and CapPa's parallel-prediction draw take their numbers from one `torch.Generator` on the model's
device (`ModelRandomness`), never from torch's global generator: nothing else that draws random numbers (data
decoding in the main process, an evaluator, a library) shifts them, and a checkpoint of the generator's state
resumes them exactly. Parts we do not own (timm's dropout and drop-path) still draw from torch's global
generators, so `random_state` captures those too; train/ uses it for checkpoints and for replaying a forward.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from open_clip.transformer import PatchDropout as OpenClipPatchDropout
from timm.layers import PatchDropout as TimmPatchDropout
from torch import nn

from contrastive.errors import ConfigError


class ModelRandomness:
    """The generator a model's random parts share. It starts on the CPU with a fixed seed, so a model built
    outside training is reproducible; the trainer `place`s it on the model's device with the run's seed."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def place(self, device: torch.device, seed: int) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)


class PatchDropout(nn.Module):
    """FLIP's patch dropout (Li et al. 2023) with open_clip's maths: in training, keep int(N * (1 - prob)) of the N
    patch tokens (at least one), chosen at random, and every prefix (class) token."""

    def __init__(self, prob: float, prefix_tokens: int, randomness: ModelRandomness) -> None:
        super().__init__()
        if not 0 <= prob < 1:
            raise ConfigError(f"model.vision.patch_dropout must be within [0, 1), got {prob}")
        self.prob = prob
        self.prefix_tokens = prefix_tokens
        self.randomness = randomness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P + N, D) -> (B, P + K, D), K = max(1, int(N * (1 - prob))) in training; unchanged in eval."""
        if not self.training or self.prob == 0:
            return x
        prefix, patches = x[:, :self.prefix_tokens], x[:, self.prefix_tokens:]
        batch, tokens = patches.shape[:2]
        keep = max(1, int(tokens * (1 - self.prob)))
        scores = torch.randn(batch, tokens, device=x.device, generator=self.randomness.generator)
        kept = scores.topk(keep, dim=-1).indices  # (B, K)
        return torch.cat((prefix, patches[torch.arange(batch, device=x.device)[:, None], kept]), dim=1)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, prefix_tokens={self.prefix_tokens}"


def draw_patch_dropout_from(tower: nn.Module, randomness: ModelRandomness) -> None:
    """Swap the patch dropout open_clip's and timm's ViTs build (it draws from torch's global generator) for ours,
    at the same rate, drawing from `randomness`."""
    for name, module in list(tower.named_modules()):
        if isinstance(module, OpenClipPatchDropout):
            prefix_tokens = 1 if module.exclude_first_token else 0
        elif type(module) is TimmPatchDropout and not module.ordered:
            prefix_tokens = module.num_prefix_tokens
        else:
            continue
        parent, _, attribute = name.rpartition(".")
        setattr(tower.get_submodule(parent), attribute, PatchDropout(module.prob, prefix_tokens, randomness))


def random_state(randomness: ModelRandomness) -> dict[str, Any]:
    """Every RNG state a training step draws from: the model's generator, torch's global CPU generator and the
    model device's CUDA one, and Python's. CPU tensors and objects; reading them never waits for the device."""
    generator = randomness.generator
    state = {"model": generator.get_state(), "model_device": generator.device.type, "torch": torch.get_rng_state(),
             "python": random.getstate()}
    if generator.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(generator.device)
    return state


def restore_random_state(randomness: ModelRandomness, state: dict[str, Any]) -> None:
    """Set what `random_state` captured. The model's generator keeps its seed when the state has none for a
    generator of its kind: a checkpoint from before models had their own, or from a run on another kind of device."""
    generator = randomness.generator
    if state.get("model_device") == generator.device.type:
        generator.set_state(state["model"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and generator.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], generator.device)
