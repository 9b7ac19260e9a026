"""Evaluation datasets in clip_benchmark's wds layout: ROOT/{split}/*.tar, classnames.txt, templates file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contrastive.data.shards import expand_shards
from contrastive.errors import InputError

PLACEHOLDER = "{c}"


@dataclass(frozen=True)
class ClassificationDataset:
    name: str
    urls: list[str]
    classnames: list[str]
    templates: list[str]


def read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise InputError(f"{what} file {path} is empty")
    return lines


def read_templates(path: Path) -> list[str]:
    """Templates hold clip_benchmark's `{c}` placeholder; the bare `{}` of OpenAI's lists is accepted too."""
    templates = [line.replace("{}", PLACEHOLDER) for line in read_lines(path, "prompt template")]
    for number, template in enumerate(templates, start=1):
        if PLACEHOLDER not in template:
            raise InputError(f"{path}:{number}: template {template!r} has no {{c}} (or {{}}) placeholder for the class name")
    return templates


def shard_urls(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise InputError(f"dataset split directory {split_dir} does not exist")
    return expand_shards(str(split_dir))


def load_classification_dataset(root: str | Path, split: str = "test", name: str | None = None) -> ClassificationDataset:
    root = Path(root)
    return ClassificationDataset(
        name=name or root.name,
        urls=shard_urls(root / split),
        classnames=read_lines(root / "classnames.txt", "class name"),
        templates=read_templates(root / "zeroshot_classification_templates.txt"),
    )
