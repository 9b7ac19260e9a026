"""Labelled images in a folder per class (torchvision ImageFolder layout): SPLIT_DIR/CLASS/*.{jpg,png,...}.

Labels are the positions of the class folders in sorted order, so ImageNet's wnid folders map to the standard
class indices (and to the built-in `imagenet1k` class names).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from contrastive.data.transforms import IMAGE_EXTENSIONS, BadSample, decode_image
from contrastive.errors import InputError


def is_image_folder(split_dir: Path) -> bool:
    return split_dir.is_dir() and any(child.is_dir() for child in split_dir.iterdir())


def scan_image_folder(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class folder names in sorted order, [(image path, label)])."""
    folders = sorted(child.name for child in split_dir.iterdir() if child.is_dir())
    samples = [
        (path, label)
        for label, folder in enumerate(folders)
        for path in sorted((split_dir / folder).rglob("*"))
        if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    ]
    if not samples:
        raise InputError(f"image folder {split_dir} has class folders but no {'/'.join(IMAGE_EXTENSIONS)} images")
    return folders, samples


class ImageFolderSamples(Dataset):
    """(image, caption "", label, key) like the shard reader, so evaluators need not know the layout."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable, image_size: int) -> None:
        self.samples = samples
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int, str]:
        path, label = self.samples[index]
        try:
            image = decode_image(path.read_bytes(), self.image_size)
        except BadSample as bad:
            raise InputError(f"bad evaluation image {path}: {bad}") from bad
        return self.transform(image), "", label, str(path)


def build_image_folder_loader(samples: list[tuple[Path, int]], transform: Callable, image_size: int,
                              batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(ImageFolderSamples(samples, transform, image_size), batch_size=batch_size,
                      num_workers=num_workers, shuffle=False)
