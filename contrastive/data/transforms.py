"""Image decoding and the train / eval transforms (torchvision v2), built from the model's preprocessing config."""

from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision.transforms import v2

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

_INTERPOLATION = {
    "bicubic": v2.InterpolationMode.BICUBIC,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "nearest": v2.InterpolationMode.NEAREST,
}


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the counter it is reported under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes, target_size: int) -> Image.Image:
    """Decode to RGB. JPEGs are decoded at a reduced scale when the target is much smaller (libjpeg's draft mode)."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format == "JPEG":
            image.draft("RGB", (target_size, target_size))
        image = image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise BadSample("corrupt_image", str(error)) from error
    if min(image.size) < 1:
        raise BadSample("empty_image", f"size {image.size}")
    return image


def _interpolation(name: str) -> v2.InterpolationMode:
    if name not in _INTERPOLATION:
        raise ValueError(f"model.interpolation={name!r} is not one of {', '.join(_INTERPOLATION)}")
    return _INTERPOLATION[name]


def build_train_transform(
    image_size: int,
    mean: list[float],
    std: list[float],
    interpolation: str = "bicubic",
    crop_scale: tuple[float, float] = (0.9, 1.0),
    horizontal_flip: bool = False,
) -> v2.Compose:
    steps = [v2.PILToTensor(), v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=_interpolation(interpolation), antialias=True)]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def build_eval_transform(image_size: int, mean: list[float], std: list[float], interpolation: str = "bicubic") -> v2.Compose:
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(image_size, interpolation=_interpolation(interpolation), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])
