"""What every export format shares: the format registry and the output directory.

An exporter is `export(model, out_dir) -> Exported`: it reads only `model.visual` (an open_clip VisionTransformer
or TimmModel), `model.cfg` (our ModelConfig, whose preprocessing is `contrastive.encoders.preprocess_from_config`)
and, for formats that carry the whole model, the open_clip module the model wraps. That is why CLIP, SigLIP, CapPa
and CoCa checkpoints all go through the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from contrastive.errors import ConfigError
from contrastive.registry import Registry


@dataclass(frozen=True)
class Exported:
    """What an exporter reports for the model card."""

    format: str
    architecture: str  # one line: what was written and which class loads it
    usage: str  # a short Python snippet that loads the export
    preprocessing_note: str = ""  # where the format's own preprocessing differs from ours, for the model card


Exporter = Callable[[nn.Module, Path], Exported]
EXPORT_FORMATS: Registry[Exporter] = Registry("export format")


def prepare_output_dir(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} is not empty; choose a new directory or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out
