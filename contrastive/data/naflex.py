"""NaFlex inputs (SigLIP 2): every image resized, keeping its aspect ratio, to the largest patch grid within a
sequence length, cut into patches, padded to that length, with each patch's (row, column) and a validity mask.

- The grid is the one transformers' `Siglip2ImageProcessor` picks (tests/test_naflex.py compares the two): a
  bisection over a scale factor s in [1e-6, 100], stopped when the interval is narrower than 1e-5, where each side
  becomes ceil(side * s / patch) patches (at least one), and the largest s whose grid holds at most `max_patches`
  patches wins.
- Patches are flattened row-major over the grid, each as (patch row, patch column, channel), as timm's NaFlexVit
  and Siglip2VisionModel take them.
- In training, the sequence length of step k is drawn from `data.naflex_seq_lens` (weights
  `data.naflex_seq_len_weights`) by a generator seeded with (seed, k) alone: every rank and every data worker
  gets the same length for a step, and a resumed run the lengths an uninterrupted one had.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms.v2 import functional

from contrastive.data.shards import slot_seed
from contrastive.data.transforms import _interpolation

SCALE_RANGE = (1e-6, 100.0)  # the bisection's starting interval, as Siglip2ImageProcessor's
SCALE_TOLERANCE = 1e-5


def _patches_along(side: int, scale: float, patch_size: int) -> int:
    return max(1, math.ceil(side * scale / patch_size))


def grid_for_max_patches(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """(rows, columns) of patches for an image of height x width pixels within `max_patches` patches."""
    low, high = SCALE_RANGE
    while high - low >= SCALE_TOLERANCE:
        middle = (low + high) / 2
        if _patches_along(height, middle, patch_size) * _patches_along(width, middle, patch_size) <= max_patches:
            low = middle
        else:
            high = middle
    return _patches_along(height, low, patch_size), _patches_along(width, low, patch_size)


def seq_len_for_step(seed: int, step: int, lengths: list[int], weights: list[float] | None = None) -> int:
    """The sequence length (patches per image) of training step `step`: the same on every rank and worker."""
    return random.Random(slot_seed(seed, "naflex_seq_len", step)).choices(lengths, weights or None)[0]


@dataclass(frozen=True)
class NaFlexImage:
    """One image as patches: uint8 (rows * columns, patch * patch * 3) and its grid (rows, columns)."""

    patches: torch.Tensor
    grid: tuple[int, int]


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(3, rows * patch, columns * patch) -> (rows * columns, patch * patch * 3), row-major, channels last."""
    channels, height, width = pixels.shape
    rows, columns = height // patch_size, width // patch_size
    patches = pixels.reshape(channels, rows, patch_size, columns, patch_size).permute(1, 3, 2, 4, 0)
    return patches.reshape(rows * columns, patch_size * patch_size * channels)


class NaFlexResize:
    """(PIL image, generator, max_patches) -> NaFlexImage: the aspect-preserving resize to the grid that fits
    `max_patches` (torchvision's antialiased kernels on uint8, as Siglip2ImageProcessor's default backend), then an
    optional horizontal flip drawn from the generator handed in (never torch's global one)."""

    def __init__(self, patch_size: int, interpolation: str, horizontal_flip: bool = False) -> None:
        self.patch_size = patch_size
        self.interpolation = _interpolation(interpolation)
        self.horizontal_flip = horizontal_flip

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None, *,
                 max_patches: int) -> NaFlexImage:
        pixels = functional.pil_to_tensor(image)  # uint8 (3, H, W)
        rows, columns = grid_for_max_patches(*pixels.shape[-2:], self.patch_size, max_patches)
        resized = functional.resize(pixels, [rows * self.patch_size, columns * self.patch_size],
                                    interpolation=self.interpolation, antialias=True)
        if self.horizontal_flip and torch.rand(1, generator=generator).item() < 0.5:
            resized = functional.horizontal_flip(resized)
        return NaFlexImage(patchify(resized, self.patch_size), (rows, columns))


@dataclass
class PatchBatch:
    """A batch of NaFlex images padded to one sequence length N: patches (B, N, P*P*3), coordinates (B, N, 2)
    int64 (row, column), valid (B, N) bool. Padding patches are zero with coordinates (0, 0)."""

    patches: torch.Tensor
    coord: torch.Tensor
    valid: torch.Tensor


def pack(images: list[NaFlexImage], seq_len: int, patches: torch.Tensor | None = None) -> PatchBatch:
    """Pad each image's patches to `seq_len` (into `patches` if given, a zeroed (B, seq_len, D) buffer)."""
    width = images[0].patches.shape[1]
    patches = torch.zeros((len(images), seq_len, width), dtype=images[0].patches.dtype) if patches is None else patches
    coord = torch.zeros((len(images), seq_len, 2), dtype=torch.int64)
    valid = torch.zeros((len(images), seq_len), dtype=torch.bool)
    for row, image in enumerate(images):
        count = image.patches.shape[0]
        patches[row, :count] = image.patches
        rows, columns = image.grid
        coord[row, :count, 0] = torch.arange(rows).repeat_interleave(columns)
        coord[row, :count, 1] = torch.arange(columns).repeat(rows)
        valid[row, :count] = True
    return PatchBatch(patches, coord, valid)


class PatchNormalize:
    """uint8 (B, N, P*P*3) channels-last patches -> float32 normalised, padding patches left at zero."""

    def __init__(self, mean: list[float], std: list[float], patch_size: int) -> None:
        repeats = patch_size * patch_size
        self.shift = (torch.tensor(mean) * 255).repeat(repeats)
        self.scale = 1 / (torch.tensor(std) * 255).repeat(repeats)

    def __call__(self, patches: torch.Tensor, valid: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty(patches.shape) if out is None else out
        out.copy_(patches).sub_(self.shift).mul_(self.scale)
        return out.mul_(valid[..., None])


def naflex_batch(images: list[Image.Image], preprocess, max_patches: int) -> PatchBatch:
    """Evaluation and export: PIL images -> a normalised PatchBatch at `max_patches`, as training sizes them
    (without the flip). `preprocess` is the model's transforms.Preprocess, whose patch_size must be set."""
    resize = NaFlexResize(preprocess.patch_size, preprocess.interpolation)
    packed = pack([resize(image.convert("RGB"), max_patches=max_patches) for image in images], max_patches)
    normalize = PatchNormalize(preprocess.mean, preprocess.std, preprocess.patch_size)
    return PatchBatch(normalize(packed.patches, packed.valid), packed.coord, packed.valid)


class NaFlexEvalRows:
    """Evaluation at a sequence length: PIL image -> float (max_patches, P*P*3 + 3), the normalised patches with
    each patch's row, column and validity appended, so that evaluation loaders batch it like any fixed-size image
    and the encoder (contrastive.encoders.naflex.NaFlexAtLength) splits it again (split_eval_rows)."""

    def __init__(self, patch_size: int, interpolation: str, mean: list[float], std: list[float],
                 max_patches: int) -> None:
        self.resize = NaFlexResize(patch_size, interpolation)
        self.normalize = PatchNormalize(mean, std, patch_size)
        self.max_patches = max_patches

    def __call__(self, image: Image.Image) -> torch.Tensor:
        packed = pack([self.resize(image, max_patches=self.max_patches)], self.max_patches)
        patches = self.normalize(packed.patches, packed.valid)[0]
        return torch.cat([patches, packed.coord[0].float(), packed.valid[0, :, None].float()], dim=1)


def split_eval_rows(rows: torch.Tensor) -> PatchBatch:
    """(B, N, P*P*3 + 3) rows of NaFlexEvalRows -> PatchBatch."""
    return PatchBatch(rows[..., :-3], rows[..., -3:-1].long(), rows[..., -1].bool())
