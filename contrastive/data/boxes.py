"""Boxes in the data, and the LocCa decoder tasks built from them (SigLIP 2's decoder objective).

A sample's ``json`` may carry GRIT-style boxes: ``{"boxes": [[x0, y0, x1, y1], ...], "phrases": [...]}``, one
phrase per box. Convention (as contrastive.data.grounding writes it): pixels of the stored image, x to the right,
y down, origin at the top-left corner of the top-left pixel, half-open (the box covers x0 <= x < x1); floats are
allowed. Boxes travel with the random crop (`crop_boxes`); a box that keeps less than MIN_VISIBLE_FRACTION of its
area inside the crop is dropped with its phrase. Horizontal flips are refused with boxes (loss=siglip_locca
requires data.horizontal_flip=false): phrases and captions may say "left" or "right", and rewriting them is
language-specific guesswork.

Coordinates become text as quantised digit strings (`box_text`): each coordinate divided by the image side and
rounded to one of `bins` integers, written zero-padded to a fixed width, "x0 y0 x1 y1" (bins=100: "07 40 99 55").
Why digits rather than new location tokens: the tokenizer, the text embeddings, every export format and every
checkpoint stay exactly as they are (nothing to resize or carry). Why a fixed width: open_clip's BPE splits a
number into single digits, each its own word, so "12 4" and "1 24" tokenize alike; with a fixed width the digit
sequence alone gives the coordinates back (`parse_box_text`).

Decoder tasks (LocCa, Wan et al. 2024), one per sample, drawn from the sample's own augmentation generator:
captioning ("caption" -> the caption), referring expression ("locate PHRASE" -> its box) and grounded captioning
("describe BOX" -> its phrase). Samples without boxes always caption.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from contrastive.data.transforms import BadSample
from contrastive.errors import ConfigError
from contrastive.types import DECODER_TASK_NAMES

MIN_VISIBLE_FRACTION = 0.5  # of a box's area, inside the crop; below it the box and its phrase are dropped
CAPTION, REFERRING, GROUNDED_CAPTION = (DECODER_TASK_NAMES.index(name) for name in DECODER_TASK_NAMES)
TASK_PROMPTS = ("caption", "locate", "describe")  # the words that open each task's decoder prompt


def read_boxes(metadata_bytes: bytes | None) -> tuple[torch.Tensor, list[str]]:
    """(boxes (K, 4) float32, phrases) from a sample's json; (0, 4) and [] when it carries none."""
    empty = torch.zeros((0, 4)), []
    if metadata_bytes is None:
        return empty
    try:
        metadata = json.loads(metadata_bytes)
    except ValueError as error:
        raise BadSample("bad_boxes", f"json does not parse: {error}") from error
    if not isinstance(metadata, dict) or "boxes" not in metadata:
        return empty
    boxes, phrases = metadata["boxes"], metadata.get("phrases")
    if not isinstance(boxes, list) or not isinstance(phrases, list) or len(boxes) != len(phrases):
        raise BadSample("bad_boxes", "boxes and phrases must be lists of the same length")
    try:
        tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    except (TypeError, ValueError, RuntimeError) as error:
        raise BadSample("bad_boxes", f"boxes are not [x0, y0, x1, y1] numbers: {error}") from error
    if len(boxes) and (not torch.isfinite(tensor).all() or (tensor[:, 2:] <= tensor[:, :2]).any()):
        raise BadSample("bad_boxes", "a box is not finite or has x1 <= x0 or y1 <= y0")
    if not all(isinstance(phrase, str) and phrase.strip() for phrase in phrases):
        raise BadSample("bad_boxes", "every phrase must be a non-empty string")
    return tensor, [phrase.strip() for phrase in phrases]


def crop_boxes(boxes: torch.Tensor, region: tuple[int, int, int, int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (K, 4) in source pixels -> (boxes in the (size, size) output, kept (K,) bool).

    `region` is the crop (top, left, height, width) in source pixels, resized to size x size. Boxes are clipped
    to the crop; one keeping less than MIN_VISIBLE_FRACTION of its area is not kept.
    """
    top, left, height, width = region
    offset = torch.tensor([left, top, left, top], dtype=torch.float32)
    limit = torch.tensor([width, height, width, height], dtype=torch.float32)
    shifted = boxes - offset
    clipped = torch.minimum(shifted.clamp(min=0), limit)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    visible = (clipped[:, 2] - clipped[:, 0]).clamp(min=0) * (clipped[:, 3] - clipped[:, 1]).clamp(min=0)
    kept = visible >= MIN_VISIBLE_FRACTION * area
    scale = torch.tensor([size / width, size / height, size / width, size / height])
    return clipped * scale, kept


def quantise(boxes: torch.Tensor, size: int, bins: int) -> torch.Tensor:
    """(K, 4) pixel boxes in a size x size image -> (K, 4) int64 in 0..bins-1 (round to the nearest bin)."""
    return torch.round(boxes / size * (bins - 1)).clamp(0, bins - 1).long()


def dequantise(quantised: torch.Tensor, size: int, bins: int) -> torch.Tensor:
    return quantised.float() * (size / (bins - 1))


def _digits_per_coordinate(bins: int) -> int:
    return len(str(bins - 1))


def box_text(box: torch.Tensor, size: int, bins: int) -> str:
    """One pixel box (4,) -> "x0 y0 x1 y1", each in 0..bins-1, zero-padded to the width of bins - 1."""
    width = _digits_per_coordinate(bins)
    return " ".join(f"{value:0{width}d}" for value in quantise(box[None], size, bins)[0].tolist())


def parse_box_text(text: str, size: int, bins: int) -> torch.Tensor | None:
    """The pixel box (4,) that the first 4 x width digits of `text` spell (spaces between digits do not matter, as
    decoded BPE puts one after each), or None when there are fewer digits or a coordinate is out of range."""
    width = _digits_per_coordinate(bins)
    digits = [character for character in text if character.isdigit()][:4 * width]
    if len(digits) < 4 * width:
        return None
    values = [int("".join(digits[index * width:(index + 1) * width])) for index in range(4)]
    if max(values) >= bins:
        return None
    return dequantise(torch.tensor(values), size, bins)


@dataclass(frozen=True)
class DecoderTasks:
    """Draws each sample's decoder task and writes its prompt and target text."""

    probabilities: tuple[float, float, float]  # caption, referring, grounded caption
    bins: int
    image_size: int

    def __post_init__(self) -> None:
        if any(p < 0 for p in self.probabilities) or not math.isclose(sum(self.probabilities), 1.0):
            raise ConfigError(f"loss.locca task probabilities must be non-negative and sum to 1, got "
                              f"{dict(zip(DECODER_TASK_NAMES, self.probabilities))}")
        if self.bins < 2:
            raise ConfigError(f"loss.locca.location_bins must be at least 2, got {self.bins}")

    def __call__(self, caption: str, boxes: torch.Tensor, phrases: list[str],
                 generator: torch.Generator) -> tuple[str, str, int]:
        """(prompt, target, task) for one sample; `boxes` in output pixels, already filtered by the crop.

        Always two draws (task, then box), with or without boxes, so one sample's draws never shift another's.
        """
        task_draw = torch.rand(1, generator=generator).item()
        box_draw = torch.rand(1, generator=generator).item()
        if len(phrases) == 0:
            return TASK_PROMPTS[CAPTION], caption, CAPTION
        task = CAPTION if task_draw < self.probabilities[0] else (
            REFERRING if task_draw < self.probabilities[0] + self.probabilities[1] else GROUNDED_CAPTION)
        if task == CAPTION:
            return TASK_PROMPTS[CAPTION], caption, CAPTION
        index = min(int(box_draw * len(phrases)), len(phrases) - 1)
        location = box_text(boxes[index], self.image_size, self.bins)
        if task == REFERRING:
            return f"{TASK_PROMPTS[REFERRING]} {phrases[index]}", location, REFERRING
        return f"{TASK_PROMPTS[GROUNDED_CAPTION]} {location}", phrases[index], GROUNDED_CAPTION


def tokenize_decoder_texts(tokenizer, prompts: list[str], targets: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, L) of "prompt target", prompt lengths (B,) counting the start token): the decoder scores the
    tokens from position prompt length on. Relies on the tokenizer splitting at spaces (open_clip's BPE does), so
    the prompt's tokens are a prefix of the whole text's."""
    tokens = tokenizer([f"{prompt} {target}" for prompt, target in zip(prompts, targets)])
    prompt_lengths = (tokenizer(prompts) != 0).sum(dim=1) - 1  # without the end-of-text token
    return tokens, prompt_lengths
