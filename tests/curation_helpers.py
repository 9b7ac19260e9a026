"""Shared pieces of the curation tests: a tiny random CLIP-style checkpoint and reading shards back."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path

from contrastive.checkpoint_io import checkpoint_path
from contrastive.train.checkpoint import save_checkpoint
from tests.export_models import clip_style_config, randomized


def tiny_checkpoint(run_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny two-tower model saved as our checkpoint: enough to test the mechanisms."""
    cfg = clip_style_config()
    path = checkpoint_path(run_dir, 1)
    save_checkpoint({"model": randomized(cfg, seed).state_dict(),
                     "config": {"name": "tiny", "model": dataclasses.asdict(cfg)}, "step": 1}, path, keep_last=1)
    return path


def read_members(shard: Path) -> dict[str, bytes]:
    """Member name -> bytes, read with tarfile alone."""
    with tarfile.open(shard) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive if member.isreg()}


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
