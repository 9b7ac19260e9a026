"""Frozen-model features over an evaluation loader: pooled image embeddings and per-block patch-token means.

Loaders yield (images, captions, labels, keys) batches, from shards (`build_eval_loader`) or an image folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from contrastive.errors import ConfigError, InputError


@dataclass
class ImageFeatures:
    features: torch.Tensor  # (N, D) float32 on CPU
    labels: torch.Tensor  # (N,) int64, -1 where a sample has no label
    captions: list[str]
    keys: list[str]


def _check_not_empty(count: int, desc: str) -> None:
    if count == 0:
        raise InputError(f"{desc}: the dataset yielded no samples (are the shards or folders empty?)")


@torch.no_grad()
def encode_images(model: nn.Module, loader: Iterable, device: torch.device, normalize: bool = True,
                  progress: bool = False, desc: str = "features") -> ImageFeatures:
    """The model's image embeddings (normalised by default, as zero-shot and retrieval use them)."""
    features, labels, captions, keys = [], [], [], []
    for images, batch_captions, batch_labels, batch_keys in tqdm(loader, desc=desc, disable=not progress):
        features.append(model.encode_image(images.to(device), normalize=normalize).float().cpu())
        labels.append(torch.as_tensor(batch_labels))
        captions.extend(batch_captions)
        keys.extend(batch_keys)
    _check_not_empty(len(features), desc)
    return ImageFeatures(torch.cat(features), torch.cat(labels), captions, keys)


@torch.no_grad()
def encode_image_blocks(model: nn.Module, loader: Iterable, device: torch.device, progress: bool = False,
                        desc: str = "block features") -> tuple[list[torch.Tensor], torch.Tensor]:
    """([(N, width) mean of the patch tokens after each vision block, first block first], labels (N,)).

    The class token is left out: these are the tokens a VLM connector consumes.
    """
    visual = getattr(model, "visual", None)
    if not hasattr(visual, "forward_intermediates"):
        raise ConfigError(f"{type(model).__name__} has no image tower that exposes per-block tokens "
                         f"(visual.forward_intermediates)")
    per_block: list[list[torch.Tensor]] = []
    labels = []
    for images, _, batch_labels, _ in tqdm(loader, desc=desc, disable=not progress):
        blocks = visual.forward_intermediates(images.to(device), intermediates_only=True, output_fmt="NLC")
        means = [tokens.mean(dim=1).float().cpu() for tokens in blocks["image_intermediates"]]  # each (B, width)
        per_block = per_block or [[] for _ in means]
        for store, mean in zip(per_block, means):
            store.append(mean)
        labels.append(torch.as_tensor(batch_labels))
    _check_not_empty(len(labels), desc)
    return [torch.cat(store) for store in per_block], torch.cat(labels)
