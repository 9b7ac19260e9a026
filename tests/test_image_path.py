"""The fast training image path (decode with JPEG draft scaling, crop and resize on uint8 tensors, normalisation on
the device) against the plain computation: a full-resolution PIL decode, PIL's bicubic crop-and-resize of the same
box (torchvision's draws from the same seed), and the normalisation formula. Issue 18 bounds what the model sees."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from contrastive.data.transforms import (
    BadSample,
    BatchNormalize,
    build_train_transform,
    decode_image,
    jpeg_frame,
    train_decode_size,
)
from contrastive.types import Batch

IMAGE_SIZE = 224
CROP_SCALE = (0.9, 1.0)
SEEDS = range(6)
# Mean absolute error, in 0-255 grey levels per channel value, between the fast path and the plain one. The same
# resize on the same pixels differs only by rounding; a JPEG decoded at 1/2 or 1/4 DCT scale differs by libjpeg's
# scaling filter against the bicubic one.
SAME_SCALE_MAE = 0.1  # measured 0.006 (256 px JPEGs) to 0.04 (Fashion-MNIST); a box off by one seed: 7.5
DRAFT_SCALE_MAE = 1.5  # measured 0.2 to 1.1 at 500-1000 px


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def fashion_mnist_images(demo_root, count: int) -> list[bytes]:
    """The PNG bytes of the first `count` demo samples (Fashion-MNIST, 28x28 greyscale)."""
    with tarfile.open(sorted((demo_root / "train").glob("*.tar"))[0]) as archive:
        members = [m for m in archive.getmembers() if m.name.endswith(".png")][:count]
        return [archive.extractfile(member).read() for member in members]


def fashion_mnist_poster(demo_root, height: int, width: int) -> bytes:
    """A large JPEG of real content: 16 demo items in a 4x4 grid, enlarged to height x width."""
    items = [np.asarray(Image.open(io.BytesIO(data))) for data in fashion_mnist_images(demo_root, 16)]
    grid = np.concatenate([np.concatenate(items[row * 4:row * 4 + 4], axis=1) for row in range(4)], axis=0)
    poster = Image.fromarray(grid).convert("RGB").resize((width, height), Image.BICUBIC)
    return jpeg(np.asarray(poster))


def photo_like(height: int, width: int) -> bytes:
    """Smooth colour gradients plus noise, as benchmarks/data_throughput.py draws them."""
    rng = np.random.default_rng(height * width)
    base = (np.linspace(0, 160, width)[None, :, None]
            + np.linspace(160, 0, height)[:, None, None] * rng.random(3)[None, None, :])
    return jpeg(np.clip(base * 0.8 + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8))


def plain_crop(data: bytes, image_size: int, seed: int) -> np.ndarray:
    """The reference: torchvision's box for this seed, drawn on the grid the image is decoded on (a JPEG much larger
    than the crop is decoded at a reduced DCT scale, which PIL's draft reports), then cut from the full-resolution
    decode and resized with PIL's bicubic filter. (image_size, image_size, 3) uint8."""
    full = Image.open(io.BytesIO(data)).convert("RGB")
    reduced = Image.open(io.BytesIO(data))
    if reduced.format == "JPEG":
        reduced.draft("RGB", (train_decode_size(image_size, CROP_SCALE),) * 2)
    torch.manual_seed(seed)
    top, left, height, width = v2.RandomResizedCrop.get_params(
        torch.empty(3, reduced.height, reduced.width), list(CROP_SCALE), [3 / 4, 4 / 3])
    scale_x, scale_y = full.width / reduced.width, full.height / reduced.height
    box = (left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)
    return np.asarray(full.resize((image_size, image_size), Image.BICUBIC, box=box))


def fast_crop(data: bytes, image_size: int, seed: int) -> np.ndarray:
    """The stream's path: decoded to a uint8 tensor (torchvision's decoder where draft mode would not reduce)."""
    transform = build_train_transform(image_size, "bicubic", crop_scale=CROP_SCALE)
    image = decode_image(data, train_decode_size(image_size, CROP_SCALE), pixels=True)
    return transform(image, torch.Generator().manual_seed(seed)).permute(1, 2, 0).numpy()


def mean_absolute_error(images: list[bytes], image_size: int) -> float:
    errors = [np.abs(fast_crop(data, image_size, seed).astype(float) - plain_crop(data, image_size, seed)).mean()
              for data in images for seed in SEEDS]
    return float(np.mean(errors))


def test_fashion_mnist_crops_match_pil_crop_and_resize(demo_root):
    assert mean_absolute_error(fashion_mnist_images(demo_root, 8), 24) < SAME_SCALE_MAE


@pytest.mark.parametrize(("height", "width"), [(256, 256), (240, 320)])
def test_256px_jpeg_crops_match_pil_crop_and_resize(height, width):
    """img2dataset's default size: decoded at full scale, so only rounding differs."""
    assert mean_absolute_error([photo_like(height, width)], IMAGE_SIZE) < SAME_SCALE_MAE


@pytest.mark.parametrize(("height", "width"), [(1000, 750), (520, 700)])
def test_large_jpeg_crops_decoded_at_reduced_scale_stay_close_to_full_resolution(demo_root, height, width):
    """Originals of 500-1000 px are decoded at 1/2 or 1/4 scale; the crop box is the same share of the image."""
    reduced = Image.open(io.BytesIO(photo_like(height, width)))
    reduced.draft("RGB", (train_decode_size(IMAGE_SIZE, CROP_SCALE),) * 2)
    assert reduced.width < width, "the draft scaling this test is about did not happen"
    for data in (photo_like(height, width), fashion_mnist_poster(demo_root, height, width)):
        assert mean_absolute_error([data], IMAGE_SIZE) < DRAFT_SCALE_MAE


def jpeg_variant(variant: str) -> bytes:
    """JPEGs as cameras and web encoders write them: progressive, with EXIF and ICC segments before the frame,
    greyscale, CMYK, 4:2:0 with optimised tables."""
    image = Image.open(io.BytesIO(photo_like(200, 300)))
    exif = Image.Exif()
    exif[0x010F] = "camera maker " * 20  # a long APP1 segment
    options = {"baseline": {}, "progressive": {"progressive": True},
               "exif_and_icc": {"exif": exif.tobytes(), "icc_profile": bytes(range(256)) * 20},
               "optimized_420": {"optimize": True, "subsampling": 2}, "greyscale": {}, "cmyk": {}}[variant]
    image = image.convert("L") if variant == "greyscale" else image.convert("CMYK") if variant == "cmyk" else image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("variant", ["baseline", "progressive", "exif_and_icc", "optimized_420", "greyscale", "cmyk"])
def test_jpeg_frame_reads_the_size_and_components_pil_reads(variant):
    data = jpeg_variant(variant)
    image = Image.open(io.BytesIO(data))
    assert jpeg_frame(data) == (image.height, image.width, len(image.getbands()))


def test_jpeg_frame_declines_what_is_not_a_readable_jpeg_header(demo_root):
    data = jpeg_variant("exif_and_icc")
    for not_readable in (fashion_mnist_images(demo_root, 1)[0], data[:300], b"\xff\xd8" + b"\x00" * 50, b""):
        assert jpeg_frame(not_readable) is None


@pytest.mark.parametrize("source", ["256px_rgb", "256px_greyscale", "fashion_mnist_png", "draft_reduced_jpeg",
                                    "progressive", "exif_and_icc"])
def test_decoded_pixels_are_pils_decode_exactly(demo_root, source):
    """decode_image(pixels=True) hands the transforms PIL's pixels, bit for bit, whichever decoder ran."""
    data = {"256px_rgb": lambda: photo_like(240, 320),
            "256px_greyscale": lambda: jpeg(np.asarray(Image.open(io.BytesIO(photo_like(256, 256))).convert("L"))),
            "fashion_mnist_png": lambda: fashion_mnist_images(demo_root, 1)[0],
            "draft_reduced_jpeg": lambda: photo_like(1000, 750),
            "progressive": lambda: jpeg_variant("progressive"), "exif_and_icc": lambda: jpeg_variant("exif_and_icc"),
            }[source]()
    decode_size = train_decode_size(IMAGE_SIZE, CROP_SCALE)
    expected = np.asarray(decode_image(data, decode_size)).transpose(2, 0, 1)
    pixels = decode_image(data, decode_size, pixels=True)
    assert pixels.dtype == torch.uint8 and pixels.shape == expected.shape
    assert np.array_equal(pixels.numpy(), expected)


def test_a_truncated_jpeg_is_still_a_corrupt_image_with_pixels():
    with pytest.raises(BadSample) as refused:
        decode_image(photo_like(256, 256)[:-2000], 237, pixels=True)
    assert refused.value.reason == "corrupt_image"


def test_device_normalisation_is_the_float_formula_on_every_view():
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=generator)
    views = torch.randint(0, 256, (4, 2, 3, 8, 8), dtype=torch.uint8, generator=generator)
    batch = BatchNormalize(mean, std).batch(Batch(images=images, tokens=torch.zeros(4, 3), global_views=views))
    for uint8, normalised in ((images, batch.images), (views, batch.global_views)):
        expected = (uint8.double() / 255 - torch.tensor(mean).double().view(3, 1, 1)) / torch.tensor(std).double().view(
            3, 1, 1)
        assert normalised.dtype == torch.float32
        assert torch.allclose(normalised.double(), expected, atol=1e-5)
    assert batch.local_views is None


@pytest.mark.parametrize("flip", [False, True])
def test_crops_of_channels_last_pixels_come_out_channels_last_with_the_same_pixels(flip):
    """The stream's batches are channels-last: a crop that comes out planar costs a transposing write, and torch's
    uint8 resize runs its slower planar path (it reads the layout off the batched crop's strides)."""
    pixels = decode_image(photo_like(256, 256), 237, pixels=True)
    assert pixels.permute(1, 2, 0).is_contiguous()
    transform = build_train_transform(IMAGE_SIZE, "bicubic", crop_scale=CROP_SCALE, horizontal_flip=flip)
    crop = transform(pixels, torch.Generator().manual_seed(1))
    planar = transform(pixels.contiguous(), torch.Generator().manual_seed(1))
    assert crop.permute(1, 2, 0).is_contiguous() and planar.is_contiguous()
    assert torch.equal(crop, planar)
