"""Class names and prompt templates: from a file, or built in (shipped as package data, nothing is downloaded).

Built in: class names `imagenet1k` (OpenAI's 1000 CLIP names, as open_clip and clip_benchmark use them),
`cifar10`, `cifar100`; templates `openai_imagenet` (OpenAI's 80 CLIP templates) and `simple` ("a photo of a {c}.").
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from contrastive.errors import InputError

PLACEHOLDER = "{c}"  # where the class name goes in a template (clip_benchmark's)

BUILTIN_CLASSNAMES = {"imagenet1k": "imagenet1k_classnames.txt", "cifar10": "cifar10_classnames.txt",
                      "cifar100": "cifar100_classnames.txt"}
BUILTIN_TEMPLATES = {"openai_imagenet": "openai_imagenet_templates.txt", "simple": "simple_templates.txt"}


def read_lines(path: Path, what: str) -> list[str]:
    """The non-blank lines of a text file, stripped; a missing or empty file is named as such."""
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
            raise InputError(f"{path}:{number}: template {template!r} has no {{c}} (or {{}}) placeholder "
                             f"for the class name")
    return templates


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
