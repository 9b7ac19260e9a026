"""Image decoding and the train / eval transforms (torchvision v2), built from a model's `Preprocess` (a value its
callers make from the model config)."""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from contrastive.errors import ConfigError

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


# Modes PIL converts to RGB faithfully.
RGB_CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
# 16-bit greyscale (PNG, TIFF; PIL opens some as 32-bit "I"): PIL's own convert would clip every value above 255 to
# white, so these are scaled to 8 bits (value >> 8) first. Float images ("F") have no agreed range and are skipped.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def _eight_bit_greyscale(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.int64)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L")


def decode_image(data: bytes, decode_size: int, min_size: int = 1) -> Image.Image:
    """Decode to RGB. A JPEG larger than twice `decode_size` is decoded at a reduced DCT scale (libjpeg's draft
    mode: 1/2, 1/4 or 1/8, never below `decode_size` on either side), which skips most of the decoding work."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.mode not in RGB_CONVERTIBLE_MODES | SIXTEEN_BIT_MODES:
            raise BadSample("wrong_image_mode", f"mode {image.mode}")
        if min(image.size) < min_size:
            raise BadSample("wrong_image_size", f"size {image.size} is below data.min_image_size={min_size}")
        if image.format == "JPEG":
            image.draft("RGB", (decode_size, decode_size))
        if image.mode in SIXTEEN_BIT_MODES:
            image = _eight_bit_greyscale(image)
        image = image.convert("RGB")
    except BadSample:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise BadSample("corrupt_image", str(error)) from error
    return image


def train_decode_size(image_size: int, crop_scale: tuple[float, float]) -> int:
    """The smallest side to decode at so the smallest random crop still has `image_size` pixels across."""
    return math.ceil(image_size / math.sqrt(crop_scale[0]))


class BatchNormalize:
    """uint8 (B, 3, H, W) -> float32 normalised, in one pass per batch instead of three per image."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.shift = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.scale = 1 / (torch.tensor(std).view(1, 3, 1, 1) * 255)

    def __call__(self, images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty(images.shape) if out is None else out
        return out.copy_(images).sub_(self.shift).mul_(self.scale)  # copy_ converts; in place avoids new memory


def _interpolation(name: str) -> v2.InterpolationMode:
    if name not in _INTERPOLATION:
        raise ConfigError(f"model.interpolation={name!r} is not one of {', '.join(_INTERPOLATION)}")
    return _INTERPOLATION[name]


def build_train_transform(
    image_size: int,
    interpolation: str = "bicubic",
    crop_scale: tuple[float, float] = (0.9, 1.0),
    horizontal_flip: bool = False,
) -> v2.Compose:
    """PIL image -> uint8 (3, image_size, image_size); the stream normalises whole batches (BatchNormalize).
    The crop is resized on the uint8 tensor (torch's vectorised antialiased kernels, faster than PIL's)."""
    steps = [v2.PILToTensor(), v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=_interpolation(interpolation), antialias=True)]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def build_eval_transform(image_size: int, mean: list[float], std: list[float], interpolation: str = "bicubic") -> v2.Compose:
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(image_size, interpolation=_interpolation(interpolation), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


@dataclass(frozen=True)
class Preprocess:
    """What a model expects of its images: the square input size, the normalisation, the resize interpolation.

    Eval preprocessing (`transform`): resize the shorter side to image_size, centre crop, scale to [0, 1], normalise.
    Training crops at random instead (build_train_transform) and normalises whole batches (BatchNormalize).
    """

    image_size: int
    mean: list[float]
    std: list[float]
    interpolation: str  # bicubic | bilinear | nearest

    def transform(self) -> v2.Compose:
        """PIL image -> (3, image_size, image_size) float tensor, exactly as our evaluators feed the model."""
        return build_eval_transform(self.image_size, self.mean, self.std, self.interpolation)

    def to_dict(self) -> dict:
        return asdict(self)
