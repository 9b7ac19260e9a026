"""The training crop and flip: parameters drawn from the per-sample generator the stream hands in, exactly as
torchvision's RandomResizedCrop and RandomHorizontalFlip would draw them, and never from torch's global generator."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from contrastive.data.transforms import build_train_transform

SCALE = (0.3, 1.0)


def photo(width: int, height: int) -> Image.Image:
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Image.fromarray(pixels.numpy())


def test_the_same_sample_seed_gives_the_same_crop_whatever_the_global_rng():
    transform = build_train_transform(28, crop_scale=SCALE, horizontal_flip=True)
    image = photo(60, 40)
    torch.manual_seed(1)
    first = transform(image, torch.Generator().manual_seed(5))
    global_state = torch.get_rng_state()
    torch.manual_seed(2)
    assert torch.equal(transform(image, torch.Generator().manual_seed(5)), first)
    assert not torch.equal(transform(image, torch.Generator().manual_seed(6)), first)
    torch.manual_seed(1)
    transform(image, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), global_state), "the transform drew from the global generator"
    assert first.dtype == torch.uint8 and first.shape == (3, 28, 28)


@pytest.mark.parametrize(("height", "width"), [(200, 200), (120, 300), (300, 20), (20, 300)])
def test_crop_boxes_are_the_ones_torchvision_draws_from_the_same_seed(height, width):
    """A generator seeded like torch's global one gives torchvision's boxes: the same algorithm, the same draws
    (thin images reach the central-crop fallback)."""
    transform = build_train_transform(28, crop_scale=SCALE)
    reference = v2.RandomResizedCrop(28, scale=SCALE)
    pixels = torch.zeros(3, height, width, dtype=torch.uint8)
    for seed in range(200):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            expected = reference.make_params([pixels])
        top, left, crop_height, crop_width = transform.crop_box(height, width, torch.Generator().manual_seed(seed))
        assert (top, left, crop_height, crop_width) == (expected["top"], expected["left"], expected["height"],
                                                        expected["width"]), seed


def test_crop_boxes_keep_the_area_share_and_aspect_ratio_bounds():
    transform = build_train_transform(28, crop_scale=SCALE)
    generator = torch.Generator().manual_seed(0)
    boxes = [transform.crop_box(400, 400, generator) for _ in range(2000)]
    shares = torch.tensor([h * w / 400**2 for _, _, h, w in boxes])
    ratios = torch.tensor([w / h for _, _, h, w in boxes])
    assert SCALE[0] * 0.99 <= shares.min() and shares.max() <= SCALE[1]  # 1%: rounding the sides to pixels
    assert 3 / 4 * 0.99 <= ratios.min() and ratios.max() <= 4 / 3 * 1.01
    assert shares.min() < SCALE[0] + 0.01 and shares.max() > SCALE[1] - 0.01  # the whole range is drawn
    assert all(0 <= top <= 400 - h and 0 <= left <= 400 - w for top, left, h, w in boxes)
    again = torch.Generator().manual_seed(0)
    assert [transform.crop_box(400, 400, again) for _ in range(2000)] == boxes
