"""Dense evaluation: a linear probe on frozen patch tokens that predicts the class under each patch of held-out
grounding canvases (contrastive.data.grounding), scored by patch and pixel accuracy and mean IoU.

Each patch's target is the class covering most of its pixels, background included (class 0; a canvas's
segmentation stores class id + 1). The probe (multinomial logistic regression on standardised tokens, its L2
strength chosen on held-out training canvases) is fitted on the train canvases' patches and scored on the test
canvases': per patch against those targets, and per pixel by giving every pixel its patch's prediction (nearest
upsampling), against the full-resolution segmentation. mIoU is the mean over the classes present in the targets or
the predictions of TP / (TP + FP + FN), accumulated over the whole test split (not averaged per image).

Patch tokens are a block's output (default the last, before any final norm), the class token dropped: from our
models and open_clip's (`visual.forward_intermediates`), transformers vision towers (`hidden_states`), or any
callable images (B, 3, S, S) -> (B, N, D) with a square grid, such as an exported bundle's VisionEncoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from contrastive.data.grounding import load_grounding_split
from contrastive.data.transforms import Preprocess
from contrastive.encoders import LoadedEncoder
from contrastive.errors import ConfigError, InputError
from contrastive.eval.linear_probe import WEIGHT_DECAYS, LinearProbe, fit_probe

PatchTokens = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, S, S) -> patch tokens (B, N, D)
BACKGROUND = "background"


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts: row = target class, column = predicted class."""
    index = targets.flatten().long() * num_classes + predictions.flatten().long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """(C,) float64 TP / (TP + FP + FN) per class; NaN for a class neither in the targets nor the predictions."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp_min(1), torch.full_like(union, math.nan))


def mean_iou(confusion: torch.Tensor) -> float:
    """The mean IoU over the classes present in the targets or the predictions."""
    iou = class_iou(confusion)
    return iou[~iou.isnan()].mean().item()


def patch_targets(segmentation: torch.Tensor, grid: int, num_classes: int) -> torch.Tensor:
    """(N, H, W) class ids -> (N, grid, grid) int64: the class covering most of each patch's pixels (ties go to
    the lower id). Patches split the canvas evenly (adaptive pooling where H or W is not a multiple of grid)."""
    cover = [F.adaptive_avg_pool2d(F.one_hot(chunk.long(), num_classes).permute(0, 3, 1, 2).float(), grid)
             for chunk in segmentation.split(64)]  # (n, C, grid, grid) pixel fractions, in chunks to bound memory
    return torch.cat(cover).argmax(dim=1)


def pixel_predictions(patch_predictions: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, grid, grid) -> (N, H, W): every pixel takes the prediction of the patch it lies in."""
    return F.interpolate(patch_predictions[:, None].float(), size=size, mode="nearest")[:, 0].long()


def encoder_patch_tokens(encoder: LoadedEncoder, feature_layer: int = -1) -> PatchTokens:
    """The patch tokens of block `feature_layer` (negative counts from the last) of any encoder load_encoder gives."""
    model = encoder.model
    visual = getattr(model, "visual", None)
    if hasattr(visual, "forward_intermediates"):  # ours and open_clip's: spatial tokens, the class token dropped
        return lambda images: visual.forward_intermediates(images, indices=[feature_layer], output_fmt="NLC",
                                                           intermediates_only=True)["image_intermediates"][0]
    hf_model = getattr(model, "hf_model", None)
    if hf_model is not None:  # transformers: hidden_states[k] is block k's output; CLIP's class token leads
        vision = getattr(hf_model, "vision_model", hf_model)  # a dual model's tower, or the vision model itself
        config = getattr(hf_model.config, "vision_config", hf_model.config)
        if not hasattr(config, "image_size"):  # Siglip2VisionModel: no fixed square grid
            raise ConfigError(f"{encoder.name} is a NaFlex {type(hf_model).__name__}; the dense probe reads one fixed "
                              f"square grid: evaluate the checkpoint of ours it was exported from")
        if not -config.num_hidden_layers <= feature_layer <= -1:
            raise ConfigError(f"feature_layer={feature_layer} is outside -{config.num_hidden_layers}..-1")
        grid = config.image_size // config.patch_size

        def hidden_tokens(images: torch.Tensor) -> torch.Tensor:
            tokens = vision(pixel_values=images, output_hidden_states=True).hidden_states[feature_layer]
            return tokens[:, tokens.shape[1] - grid * grid:]
        return hidden_tokens
    raise ConfigError(f"{encoder.name} ({type(model).__name__}) exposes no patch tokens for a dense probe")


@dataclass
class PatchFeatures:
    tokens: torch.Tensor  # (N, grid, grid, D) float32 on CPU
    grid: int


@torch.no_grad()
def canvas_patch_features(patch_tokens: PatchTokens, images: np.ndarray, preprocess: Preprocess,
                          device: torch.device, batch_size: int = 256, progress: bool = False,
                          desc: str = "patch tokens") -> PatchFeatures:
    """Patch tokens of uint8 canvases (N, H, W[, 3]) fed as the encoder's eval preprocessing feeds images."""
    if images.shape[1] != images.shape[2]:
        raise InputError(f"canvases are {images.shape[1]}x{images.shape[2]}: a dense probe needs square canvases "
                         f"(the eval preprocessing centre-crops, which would misalign the segmentation)")
    transform = preprocess.transform()
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress):
        batch = torch.stack([transform(Image.fromarray(image).convert("RGB"))
                             for image in images[start:start + batch_size]])
        chunks.append(patch_tokens(batch.to(device)).float().cpu())  # (B, N, D)
    if not chunks:
        raise InputError(f"{desc}: no canvases to encode")
    tokens = torch.cat(chunks)
    grid = math.isqrt(tokens.shape[1])
    if grid * grid != tokens.shape[1]:
        raise ConfigError(f"the encoder gives {tokens.shape[1]} patch tokens, not a square grid")
    return PatchFeatures(tokens.view(len(tokens), grid, grid, -1), grid)


def fit_dense_probe(features: PatchFeatures, targets: torch.Tensor, num_classes: int, val_fraction: float = 0.2,
                    seed: int = 0, weight_decays: Sequence[float] = WEIGHT_DECAYS) -> LinearProbe:
    """A probe on every training patch; its weight decay is chosen on the patches of a random `val_fraction` of
    the canvases (whole canvases, so neighbouring patches do not leak), then it is refitted on all of them."""
    count = len(targets)
    if count < 2:
        raise InputError(f"a dense probe needs at least 2 training canvases, got {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    cut = min(count - 1, max(1, round(count * val_fraction)))
    val, fit = order[:cut], order[cut:]
    width = features.tokens.shape[-1]
    return fit_probe(features.tokens[fit].reshape(-1, width), targets[fit].flatten(),
                     features.tokens[val].reshape(-1, width), targets[val].flatten(), num_classes, weight_decays,
                     standardize=True, refit_on_validation=True)


def score_dense_probe(probe: LinearProbe, features: PatchFeatures, segmentation: torch.Tensor,
                      num_classes: int) -> dict[str, float]:
    """Patch and pixel accuracy and mIoU of `probe` on canvases with (N, H, W) class-id `segmentation`."""
    width = features.tokens.shape[-1]
    predicted = probe.logits(features.tokens.reshape(-1, width)).argmax(dim=1).view(-1, features.grid, features.grid)
    targets = patch_targets(segmentation, features.grid, num_classes)
    patch_confusion = confusion_matrix(predicted, targets, num_classes)
    pixel_confusion = confusion_matrix(pixel_predictions(predicted, tuple(segmentation.shape[1:])), segmentation,
                                       num_classes)
    return {
        "pixel_acc": (pixel_confusion.trace() / pixel_confusion.sum()).item(),
        "miou": mean_iou(pixel_confusion),
        "patch_acc": (patch_confusion.trace() / patch_confusion.sum()).item(),
        "patch_miou": mean_iou(patch_confusion),
        "weight_decay": probe.weight_decay,
    }


class DenseProbeEvaluation:
    """Evaluator: run(encoder, device) -> metrics of a dense probe fitted on the `train_split` canvases of a
    grounding dataset and scored on its `split` canvases. `image_size` feeds the canvases at that size instead of
    the encoder's own (towers that resample their position embeddings: a finer patch grid); the probe's L2
    strength is the best of `weight_decays` on held-out training canvases."""

    def __init__(self, name: str | None, root: str | Path, split: str = "test", train_split: str = "train",
                 batch_size: int = 256, feature_layer: int = -1, image_size: int | None = None,
                 progress: bool = False, weight_decays: Sequence[float] = WEIGHT_DECAYS) -> None:
        self.train = load_grounding_split(root, train_split)
        self.test = load_grounding_split(root, split)
        self.name = name or Path(root).name
        self.class_names = [BACKGROUND, *self.test.class_names]
        self.batch_size = batch_size
        self.feature_layer = feature_layer
        self.image_size = image_size
        self.progress = progress
        self.weight_decays = tuple(weight_decays)

    def run(self, encoder: LoadedEncoder, device: torch.device) -> dict[str, float]:
        if isinstance(encoder.model, nn.Module):
            encoder.model.eval()
        return self.run_tokens(encoder_patch_tokens(encoder, self.feature_layer), encoder.preprocess, device)

    def run_tokens(self, patch_tokens: PatchTokens, preprocess: Preprocess, device: torch.device) -> dict[str, float]:
        """The same for any patch-token function and the preprocessing its images need."""
        if self.image_size is not None:
            preprocess = replace(preprocess, image_size=self.image_size)
        num_classes = len(self.class_names)
        for split in (self.train, self.test):
            if split.segmentation.max(initial=0) >= num_classes:
                raise InputError(f"a segmentation holds class value {split.segmentation.max()}, beyond the "
                                 f"{num_classes - 1} classes (+ background) in classes.json")
        common = {"patch_tokens": patch_tokens, "preprocess": preprocess, "device": device,
                  "batch_size": self.batch_size, "progress": self.progress}
        train = canvas_patch_features(images=self.train.images, desc="train patch tokens", **common)
        test = canvas_patch_features(images=self.test.images, desc="test patch tokens", **common)
        targets = patch_targets(torch.from_numpy(self.train.segmentation), train.grid, num_classes)
        probe = fit_dense_probe(train, targets, num_classes, weight_decays=self.weight_decays)
        return score_dense_probe(probe, test, torch.from_numpy(self.test.segmentation).long(), num_classes)
