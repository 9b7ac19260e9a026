"""Opening an evaluation dataset: clip_benchmark's wds layout (ROOT/SPLIT/*.tar) or an image folder
(ROOT/SPLIT/CLASS/*.jpg), with class names and templates from the dataset, a file, or a built-in list, and its
loader for an encoder's preprocessing.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader

from contrastive.data.loader import build_eval_loader
from contrastive.data.shards import expand_shards, is_local
from contrastive.data.transforms import Preprocess
from contrastive.errors import InputError
from contrastive.eval.image_folder import build_image_folder_loader, is_image_folder, scan_image_folder
from contrastive.eval.prompts import load_classnames, load_templates, read_lines, read_templates

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


@dataclass(frozen=True)
class EvalDataset:
    name: str
    split_dir: Path
    urls: list[str] = field(default_factory=list)  # shards; empty for an image folder
    images: list[tuple[Path, int]] = field(default_factory=list)  # image folder: (path, label)
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)

    def loader(self, preprocess: Preprocess, batch_size: int, num_workers: int = 0) -> DataLoader:
        """(images, captions, labels, keys) batches in dataset order, preprocessed as the encoder expects."""
        if self.urls:
            return build_eval_loader(self.urls, preprocess, batch_size, num_workers)
        return build_image_folder_loader(self.images, preprocess.transform(), preprocess.decode_size, batch_size,
                                         num_workers)


def check_shards_not_empty(urls: list[str]) -> None:
    """An empty shard usually means a failed export; say so before a metric is computed over missing data."""
    for url in urls:
        if not is_local(url):
            continue
        if Path(url).stat().st_size == 0:
            raise InputError(f"shard {url} is empty (0 bytes)")
        try:
            with tarfile.open(url) as archive:
                first = archive.next()
        except tarfile.TarError as error:
            raise InputError(f"shard {url} is not a readable tar file: {error}") from error
        if first is None:
            raise InputError(f"shard {url} is empty (a tar archive with no samples)")


def _shard_urls(split_dir: Path) -> list[str]:
    """Every .tar in the split directory (listed by the data layer), none of them empty."""
    urls = expand_shards(str(split_dir))
    check_shards_not_empty(urls)
    return urls


def _split_dir(root: Path, split: str) -> Path:
    split_dir = root / split
    if not split_dir.is_dir():
        raise InputError(f"dataset split directory {split_dir} does not exist")
    return split_dir


def open_classification_dataset(root: str | Path, split: str = "test", name: str | None = None,
                                classnames: str | None = None, templates: str | None = None) -> EvalDataset:
    """`classnames` / `templates`: a file or built-in name; None takes the dataset's own files
    (for an image folder without classnames.txt, the class folder names with '_' read as spaces)."""
    root = Path(root)
    split_dir = _split_dir(root, split)
    urls: list[str] = []
    images: list[tuple[Path, int]] = []
    if is_image_folder(split_dir):
        folders, images = scan_image_folder(split_dir)
        if classnames is None and not (root / CLASSNAMES_FILE).is_file():
            names = [folder.replace("_", " ") for folder in folders]
        else:
            names = load_classnames(classnames) if classnames else read_lines(root / CLASSNAMES_FILE, "class name")
        if len(names) != len(folders):
            raise InputError(f"{len(names)} class names for {len(folders)} class folders in {split_dir}")
    else:
        urls = _shard_urls(split_dir)
        names = load_classnames(classnames) if classnames else read_lines(root / CLASSNAMES_FILE, "class name")
    if templates:
        prompts = load_templates(templates)
    elif (root / TEMPLATES_FILE).is_file() or urls:
        prompts = read_templates(root / TEMPLATES_FILE)
    else:
        raise InputError(f"{root} has no {TEMPLATES_FILE}; give templates (a file, or a built-in name such as "
                         f"openai_imagenet)")
    return EvalDataset(name or root.name, split_dir, urls, images, names, prompts)


def open_retrieval_dataset(root: str | Path, split: str = "test", name: str | None = None) -> EvalDataset:
    """Paired image-text shards; each sample's .txt holds one caption per line (clip_benchmark's retrieval layout)."""
    root = Path(root)
    return EvalDataset(name or root.name, _split_dir(root, split), urls=_shard_urls(_split_dir(root, split)))
