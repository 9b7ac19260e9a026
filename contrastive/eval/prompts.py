"""Class names and prompt templates: from a file, or built in (shipped as package data, nothing is downloaded).

Built in: class names `imagenet1k` (OpenAI's 1000 CLIP names, as open_clip and clip_benchmark use them),
`cifar10`, `cifar100`; templates `openai_imagenet` (OpenAI's 80 CLIP templates) and `simple` ("a photo of a {c}.").
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from contrastive.eval.datasets import PLACEHOLDER, read_lines, read_templates
from contrastive.errors import InputError

BUILTIN_CLASSNAMES = {"imagenet1k": "imagenet1k_classnames.txt", "cifar10": "cifar10_classnames.txt",
                      "cifar100": "cifar100_classnames.txt"}
BUILTIN_TEMPLATES = {"openai_imagenet": "openai_imagenet_templates.txt", "simple": "simple_templates.txt"}


def _resource(filename: str) -> Path:
    return Path(str(resources.files("contrastive.eval") / "resources" / filename))


def _file_or_builtin(spec: str, builtin: dict[str, str], what: str) -> Path:
    if spec in builtin:
        return _resource(builtin[spec])
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"{what} {spec!r} is neither a file nor a built-in list ({', '.join(builtin)})")
    return path


def load_classnames(spec: str) -> list[str]:
    """One class name per line; blank lines are ignored."""
    return read_lines(_file_or_builtin(spec, BUILTIN_CLASSNAMES, "class name file"), "class name")


def load_templates(spec: str) -> list[str]:
    """One template per line with `{c}` (clip_benchmark) or `{}` (OpenAI) where the class name goes."""
    return read_templates(_file_or_builtin(spec, BUILTIN_TEMPLATES, "prompt template file"))


def fill_template(template: str, classname: str) -> str:
    return template.replace(PLACEHOLDER, classname)
