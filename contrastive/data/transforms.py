"""Image decoding and the train / eval transforms (torchvision v2), built from a model's `Preprocess` (a value its
callers make from the model config)."""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional

from contrastive.errors import ConfigError
from contrastive.types import Batch

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CROP_RATIO = (3 / 4, 4 / 3)  # the aspect ratios (width / height) a random crop may have: torchvision's default

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


JPEG_END = b"\xff\xd9"  # the end-of-image marker; a JPEG without it is cut short
# Start-of-frame markers of the 8-bit Huffman JPEGs PIL and torchvision both decode: baseline, extended, progressive
JPEG_FRAME_MARKERS = frozenset({0xC0, 0xC1, 0xC2})
JPEG_SCAN_START = 0xDA  # entropy-coded data follows; a frame header comes before it


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) read from a JPEG's frame header, walking its marker segments (a few, each a length
    apart), or None where the bytes are not a well-formed 8-bit Huffman JPEG up to its frame header. Asking PIL
    (Image.open parses every segment in Python) costs about a tenth of decoding a 256 px JPEG."""
    if not data.startswith(b"\xff\xd8"):
        return None
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:  # a fill byte before the marker
            offset += 1
            continue
        if marker in JPEG_FRAME_MARKERS:
            header = data[offset + 4:offset + 10]
            if len(header) < 6 or header[0] != 8:
                return None
            height, width = int.from_bytes(header[1:3], "big"), int.from_bytes(header[3:5], "big")
            return (height, width, header[5]) if height and width else None
        if marker == JPEG_SCAN_START or 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return None  # a scan before any frame, or a frame type (lossless, arithmetic) left to PIL
        offset += 2 + int.from_bytes(data[offset + 2:offset + 4], "big")
    return None


def decode_image(data: bytes, decode_size: int, min_size: int = 1,
                 pixels: bool = False) -> Image.Image | torch.Tensor:
    """Decode to RGB. A JPEG larger than twice `decode_size` is decoded at a reduced DCT scale (libjpeg's draft
    mode: 1/2, 1/4 or 1/8, never below `decode_size` on either side), which skips most of the decoding work.

    `pixels`: return uint8 (3, H, W) with channels-last memory (as_pixels) instead of a PIL image. A complete RGB or
    greyscale JPEG that draft mode would not reduce is then decoded by torchvision's decode_jpeg straight into a
    tensor, its size read from the frame header (jpeg_frame), without PIL: the same libjpeg-turbo and the same pixels
    (tests/test_image_path.py). Truncated JPEGs (no end marker), CMYK ones and every other format stay on PIL's
    path, which refuses or converts them as before."""
    try:
        frame = jpeg_frame(data) if pixels and data.endswith(JPEG_END) else None
        if frame is not None and frame[2] in (1, 3):
            if min(frame[:2]) < min_size:
                raise BadSample("wrong_image_size", f"size {frame[1::-1]} is below data.min_image_size={min_size}")
            if min(side // decode_size for side in frame[:2]) < 2:  # PIL's draft: no reduction below 2
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        image = Image.open(io.BytesIO(data))
        if image.mode not in RGB_CONVERTIBLE_MODES | SIXTEEN_BIT_MODES:
            raise BadSample("wrong_image_mode", f"mode {image.mode}")
        if min(image.size) < min_size:
            raise BadSample("wrong_image_size", f"size {image.size} is below data.min_image_size={min_size}")
        if image.format == "JPEG":
            image.draft("RGB", (decode_size, decode_size))
        image.load()  # decode here, so corrupt data is a BadSample and not an error in the transform
        if image.mode in SIXTEEN_BIT_MODES:
            image = _eight_bit_greyscale(image)
        if image.mode != "RGB":  # convert() would copy an RGB image too
            image = image.convert("RGB")
    except BadSample:
        raise
    except Exception as error:  # PIL and torchvision raise many types for bad bytes
        raise BadSample("corrupt_image", str(error)) from error
    return as_pixels(image) if pixels else image


def as_pixels(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W): a tensor as it is; a PIL RGB image copied once out of PIL (pil_to_tensor copies twice), its
    memory channels-last, which torch's uint8 resize takes its vectorised path on."""
    if isinstance(image, torch.Tensor):
        return image
    with warnings.catch_warnings():  # the pixels are only read, never written: PIL's read-only buffer will do
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


def naflex_decode_size(patch_size: int, max_patches: int) -> int:
    """The shorter side to decode JPEGs at (draft mode) for NaFlex: a grid within max_patches patches has at most
    about sqrt(max_patches) of them on its shorter side, and draft decoding keeps the aspect ratio."""
    return (math.isqrt(max_patches) + 2) * patch_size


def train_decode_size(image_size: int, crop_scale: tuple[float, float]) -> int:
    """The smallest side to decode at so the smallest random crop still has `image_size` pixels across."""
    return math.ceil(image_size / math.sqrt(crop_scale[0]))


class BatchNormalize:
    """uint8 (..., 3, H, W) -> float32 normalised, on the device the images are on.

    The stream yields uint8 batches: a quarter of the bytes of float32 through shared memory, pinned memory and the
    host-to-device copy, and no per-batch float pass in the DataLoader workers. The trainer normalises each batch
    once it is on its device (`batch`), where the conversion is one fused pass per tensor."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.shift = torch.tensor(mean).view(3, 1, 1) * 255
        self.scale = 1 / (torch.tensor(std).view(3, 1, 1) * 255)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        shift, scale = self.shift.to(images.device), self.scale.to(images.device)
        # contiguous planes whatever the layout the stream used (channels-last); in place: no second float copy
        return images.to(torch.float32, memory_format=torch.contiguous_format).sub_(shift).mul_(scale)

    def batch(self, batch: Batch) -> Batch:
        """The batch with its images and any extra views normalised. NaFlex patches arrive normalised (the stream's
        workers normalise them, padding left at zero); teachers' views stay uint8 (each normalises its own way)."""
        views = {name: self(getattr(batch, name)) for name in ("global_views", "local_views")
                 if getattr(batch, name) is not None}
        images = batch.images if batch.patch_coord is not None else self(batch.images)
        return replace(batch, images=images, **views)


def _interpolation(name: str) -> v2.InterpolationMode:
    if name not in _INTERPOLATION:
        raise ConfigError(f"model.interpolation={name!r} is not one of {', '.join(_INTERPOLATION)}")
    return _INTERPOLATION[name]


class RandomCropFlip:
    """PIL image -> uint8 (3, size, size): a random resized crop and an optional horizontal flip whose parameters come
    from the generator handed in with each image, never from torch's global generator.

    The draws are torchvision's v2 RandomResizedCrop then RandomHorizontalFlip, in the same order: a generator seeded
    like torch's global one gives the crops and flips torchvision would. The crop is resized on the uint8 tensor
    (torch's vectorised antialiased kernels, faster than PIL's).
    """

    def __init__(self, size: int, interpolation: str, crop_scale: tuple[float, float], horizontal_flip: bool) -> None:
        self.size = size
        self.interpolation = _interpolation(interpolation)
        self.scale = tuple(crop_scale)
        self.log_ratio = torch.log(torch.tensor(CROP_RATIO)).tolist()  # float32 logs, as torchvision computes them
        self.horizontal_flip = horizontal_flip

    def crop_box(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width): up to 10 draws of an area share in `scale` and a log aspect ratio,
        the first box that fits the image wins; else the central crop closest to the allowed ratios."""
        area = height * width
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale, generator=generator).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(*self.log_ratio, generator=generator)).item()
            crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
            crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = torch.randint(0, height - crop_height + 1, size=(1,), generator=generator).item()
                left = torch.randint(0, width - crop_width + 1, size=(1,), generator=generator).item()
                return top, left, crop_height, crop_width
        in_ratio = width / height
        if in_ratio < CROP_RATIO[0]:
            crop_width, crop_height = width, int(round(width / CROP_RATIO[0]))
        elif in_ratio > CROP_RATIO[1]:
            crop_width, crop_height = int(round(height * CROP_RATIO[1])), height
        else:
            crop_width, crop_height = width, height
        return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width

    def draw(self, height: int, width: int, generator: torch.Generator) -> CropParams:
        """The crop box, then the flip, in torchvision's order of draws."""
        top, left, crop_height, crop_width = self.crop_box(height, width, generator)
        flip = self.horizontal_flip and torch.rand(1, generator=generator).item() < 0.5
        return CropParams(top, left, crop_height, crop_width, flip)

    def __call__(self, image: Image.Image | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        pixels = as_pixels(image)  # (3, H, W) channels-last
        return apply_crop(pixels, self.draw(*pixels.shape[-2:], generator), self.size, self.interpolation)

    def crop_with_region(self, image: Image.Image | torch.Tensor,
                         generator: torch.Generator) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """The random resized crop without the flip, and its region (top, left, height, width) in source pixels:
        what moves a sample's boxes with it (contrastive.data.boxes.crop_boxes)."""
        pixels = as_pixels(image)  # uint8 (3, H, W)
        region = self.crop_box(*pixels.shape[-2:], generator)
        return apply_crop(pixels, CropParams(*region, flip=False), self.size, self.interpolation), region


@dataclass(frozen=True)
class DeviceJpeg:
    """A JPEG a DataLoader worker leaves for the trainer's device to decode (data.decode_device=cuda), with the crop
    it drew: (top, left, height, width) in the full-resolution image's pixels, and the flip."""

    data: bytes
    crop: tuple[int, int, int, int, bool]


class DeviceJpegCrop:
    """(JPEG bytes, generator) -> DeviceJpeg, from the JPEG's header alone; None for a sample the worker decodes
    itself (not a JPEG, CMYK, or cut short: no end marker).

    The box is drawn as the CPU path draws it (the same generator draws on the same grid: the one draft mode
    decodes at, whose size PIL's draft reports without decoding), then scaled to the full-resolution image, which
    the device decodes (nvJPEG has no reduced DCT scale): exact at 256 px, within a rounding of the draft scale
    above."""

    def __init__(self, crop: RandomCropFlip, decode_size: int, min_size: int = 1) -> None:
        self.crop, self.decode_size, self.min_size = crop, decode_size, min_size

    def __call__(self, data: bytes, generator: torch.Generator) -> DeviceJpeg | None:
        try:
            image = Image.open(io.BytesIO(data))
        except Exception:  # not an image PIL knows: the worker's decode counts it
            return None
        if image.format != "JPEG" or image.mode not in ("RGB", "L") or not data.endswith(JPEG_END):
            return None
        if min(image.size) < self.min_size:
            raise BadSample("wrong_image_size", f"size {image.size} is below data.min_image_size={self.min_size}")
        full_width, full_height = image.size
        image.draft("RGB", (self.decode_size, self.decode_size))  # sets the reduced size; decodes nothing
        params = self.crop.draw(image.height, image.width, generator)
        scale_y, scale_x = full_height / image.height, full_width / image.width
        top, left = min(round(params.top * scale_y), full_height - 1), min(round(params.left * scale_x), full_width - 1)
        height = min(max(1, round(params.height * scale_y)), full_height - top)
        width = min(max(1, round(params.width * scale_x)), full_width - left)
        return DeviceJpeg(data, (top, left, height, width, params.flip))


def decode_on_device(batch: Batch, interpolation: str, device: torch.device) -> Batch:
    """The batch with its JPEGs (Batch.jpeg_bytes) decoded on `device` (torchvision's decode_jpeg, nvJPEG on CUDA),
    cropped, resized to the batch's size (antialiased, in float32: CUDA has no uint8 antialiased kernel, rounded
    back to uint8 as the CPU path's uint8 kernel rounds), flipped where drawn, and written into its uint8 images,
    which must already be on `device` (Batch.to). Rows the worker decoded (None) are left as they are. A JPEG the
    device cannot decode is decoded on the CPU; one neither can is left black and logged: it is in the batch
    already and cannot be skipped here."""
    rows = [row for row, data in enumerate(batch.jpeg_bytes) if data is not None]
    if not rows:
        return replace(batch, jpeg_bytes=[], jpeg_crops=[])
    images, size = batch.images, batch.images.shape[-1]
    mode = _interpolation(interpolation).value
    # decode_jpeg reads the encoded bytes from host memory (nvJPEG parses them there) and returns uint8 (3, H, W)
    # on the device; frombuffer wants writable memory, hence the bytearray.
    encoded = [torch.frombuffer(bytearray(batch.jpeg_bytes[row]), dtype=torch.uint8) for row in rows]
    try:
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad JPEG fails the whole batched call: decode one by one
        decoded = [_decode_one(data, device) for data in encoded]
    for row, pixels in zip(rows, decoded):
        if pixels is None:
            images[row] = 0
            continue
        top, left, height, width, flip = batch.jpeg_crops[row]
        crop = pixels[:, top:top + height, left:left + width].unsqueeze(0).to(torch.float32)
        crop = torch.nn.functional.interpolate(crop, size=(size, size), mode=mode,
                                               align_corners=None if mode == "nearest" else False,
                                               antialias=mode != "nearest")[0]
        crop = crop.round_().clamp_(0, 255).to(torch.uint8)
        images[row] = crop.flip(-1) if flip else crop
    return replace(batch, images=images, jpeg_bytes=[], jpeg_crops=[])


def _decode_one(encoded: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One JPEG on `device`, else decoded on the CPU (libjpeg-turbo takes JPEG variants nvJPEG may refuse) and
    copied over; None (logged) when neither can."""
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB).to(device)
    except RuntimeError as error:
        log.warning("a JPEG the worker's header check passed failed to decode (left black): %s", error)
        return None


@dataclass(frozen=True)
class CropParams:
    """One random augmentation, enough to replay it: the crop box in the decoded image's pixels and the flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def to_dict(self) -> dict:
        return asdict(self)


def apply_crop(pixels: torch.Tensor, params: CropParams, size: int,
               interpolation: v2.InterpolationMode | str) -> torch.Tensor:
    """uint8 (3, H, W), planar or channels-last (as_pixels) -> uint8 (3, size, size) in the same layout: the crop
    resized (antialiased), then the flip. torch's kernel straight away, as torchvision's resized_crop calls it after
    its checks: the same pixels whichever the layout (tests/test_image_path.py)."""
    mode = (_interpolation(interpolation) if isinstance(interpolation, str) else interpolation).value
    # (1, 3, h, w) made from the (H, W, 3) view, so the batch dimension's stride spans the crop: from channels-last
    # pixels torch's uint8 resize then sees channels-last and takes its vectorised path, and returns channels-last
    # (unsqueezing the (3, H, W) view gives a stride it reads as planar: 1.5x slower, and a planar crop that the
    # write into the stream's channels-last batch has to transpose)
    crop = (pixels.permute(1, 2, 0)[params.top:params.top + params.height, params.left:params.left + params.width]
            .unsqueeze(0).permute(0, 3, 1, 2))
    crop = torch.nn.functional.interpolate(crop, size=(size, size), mode=mode,
                                           align_corners=None if mode == "nearest" else False,
                                           antialias=mode != "nearest")[0]
    return crop.flip(-1) if params.flip else crop


def scale_crop(params: CropParams, source_size: tuple[int, int], decoded_size: tuple[int, int]) -> CropParams:
    """A crop box drawn on the stored image (height, width) `source_size`, on the same image decoded at
    `decoded_size` (a JPEG draft-decoded at 1/2, 1/4 or 1/8 scale): each edge scaled and rounded, at least one
    pixel kept. The identity where the sizes agree (full decoding, every other format)."""
    if tuple(source_size) == tuple(decoded_size):
        return params
    (source_height, source_width), (height, width) = source_size, decoded_size
    top = min(round(params.top * height / source_height), height - 1)
    left = min(round(params.left * width / source_width), width - 1)
    bottom = max(round((params.top + params.height) * height / source_height), top + 1)
    right = max(round((params.left + params.width) * width / source_width), left + 1)
    return CropParams(top, left, bottom - top, right - left, params.flip)


def stored_decode_size(boxes: list[CropParams], source_size: tuple[int, int], size: int) -> int:
    """The decode size (decode_image's draft request) at which each of `boxes`, drawn on a `source_size` image,
    keeps at least about `size` pixels on both sides once scaled to the decoded image (scale_crop)."""
    height, width = source_size
    return math.ceil(size * max(max(height / box.height, width / box.width) for box in boxes))


class TeacherViewCrops:
    """(PIL image, generator) -> uint8 (student crop (3, S, S), teacher crop (3, T, T)): one augmentation drawn
    (the student's draws, as without teachers) and cut at both resolutions, so teacher and student see the same
    crop and flip, each at its own size."""

    def __init__(self, student: RandomCropFlip, teacher_size: int, teacher_interpolation: str) -> None:
        self.student, self.teacher_size = student, teacher_size
        self.teacher_interpolation = _interpolation(teacher_interpolation)

    def __call__(self, image: Image.Image | torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = as_pixels(image)
        params = self.student.draw(*pixels.shape[-2:], generator)
        return (apply_crop(pixels, params, self.student.size, self.student.interpolation),
                apply_crop(pixels, params, self.teacher_size, self.teacher_interpolation))


class StoredCrop:
    """(PIL image, params, source_size) -> uint8 (3, size, size): a stored augmentation (a reinforced data set's, its
    box in the stored image's pixels) replayed on the image as decoded, draft decoding included (scale_crop)."""

    def __init__(self, size: int, interpolation: str) -> None:
        self.size, self.interpolation = size, _interpolation(interpolation)

    def __call__(self, image: Image.Image | torch.Tensor, params: CropParams,
                 source_size: tuple[int, int]) -> torch.Tensor:
        pixels = as_pixels(image)
        return apply_crop(pixels, scale_crop(params, source_size, tuple(pixels.shape[-2:])), self.size,
                          self.interpolation)


def teacher_input(pixels: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 (B, 3, T, T) teacher views -> float (B, 3, s, s) at the teacher's own size `s` (resized where the views
    were cut for a larger teacher) and normalised with its own mean and std."""
    images = pixels.float().div_(255)
    if images.shape[-1] != preprocess.image_size:
        images = functional.resize(images, [preprocess.image_size, preprocess.image_size],
                                   interpolation=_interpolation(preprocess.interpolation), antialias=True)
    mean = torch.tensor(preprocess.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def build_train_transform(
    image_size: int,
    interpolation: str = "bicubic",
    crop_scale: tuple[float, float] = (0.9, 1.0),
    horizontal_flip: bool = False,
) -> RandomCropFlip:
    """(PIL image, generator) -> uint8 (3, image_size, image_size); whole batches are normalised on the device
    (BatchNormalize)."""
    return RandomCropFlip(image_size, interpolation, crop_scale, horizontal_flip)


class MultiViewCrops:
    """(PIL image, generator) -> uint8 (plain (3, H, W), global views (G, 3, g, g), local views (L, 3, l, l)): the
    plain crop first (the same draws as without views), then each extra view's crop and flip, from the same
    generator, so a sample's views are as reproducible as its plain crop."""

    def __init__(self, plain: RandomCropFlip, global_crop: RandomCropFlip, global_views: int,
                 local_crop: RandomCropFlip, local_views: int) -> None:
        self.plain, self.global_crop, self.local_crop = plain, global_crop, local_crop
        self.global_views, self.local_views = global_views, local_views

    def __call__(self, image: Image.Image | torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        image = as_pixels(image)  # copied out of PIL once for all the views
        plain = self.plain(image, generator)
        global_views = torch.stack([self.global_crop(image, generator) for _ in range(self.global_views)])
        local_views = torch.stack([self.local_crop(image, generator) for _ in range(self.local_views)])
        return plain, global_views, local_views


def build_eval_transform(image_size: int, mean: list[float], std: list[float],
                         interpolation: str = "bicubic") -> v2.Compose:
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
    Training crops at random instead (build_train_transform) and normalises whole batches on the device
    (BatchNormalize).
    """

    image_size: int
    mean: list[float]
    std: list[float]
    interpolation: str  # bicubic | bilinear | nearest
    patch_size: int | None = None  # NaFlex towers only: the patch side their patch sequences use
    seq_len: int | None = None  # NaFlex evaluation at this many patches per image (contrastive-eval --seq-len)

    def transform(self) -> v2.Compose:
        """PIL image -> (3, image_size, image_size) float tensor, exactly as our evaluators feed the model; with
        seq_len set, naflex.NaFlexEvalRows's (seq_len, P*P*3 + 3) rows instead."""
        if self.seq_len is not None:
            from contrastive.data.naflex import NaFlexEvalRows  # it builds on this module

            return NaFlexEvalRows(self.patch_size, self.interpolation, self.mean, self.std, self.seq_len)
        return build_eval_transform(self.image_size, self.mean, self.std, self.interpolation)

    @property
    def checked_size(self) -> int | None:
        """The side every transformed image must have; None where the transform sizes each image (NaFlex)."""
        return None if self.seq_len is not None else self.image_size

    @property
    def decode_size(self) -> int:
        """The shorter side JPEGs are decoded at (draft mode) for this preprocessing."""
        if self.seq_len is None:
            return self.image_size
        return naflex_decode_size(self.patch_size, self.seq_len)

    def to_dict(self) -> dict:
        return asdict(self)
