"""Rebuilding a trained model (and its tokenizer) from a checkpoint of ours, for evaluation and export."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from torch import nn

from contrastive.config import ModelConfig
from contrastive.models import build_model, build_tokenizer
from contrastive.train.checkpoint import apply_model_state, list_checkpoints, load_checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its newest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise ValueError(f"run directory {path} holds no checkpoints (looked in {path / 'checkpoints'})")
        return found[-1][1]
    return path


def load_trained_model(path: str | Path) -> tuple[nn.Module, object, dict]:
    """(model in eval mode, tokenizer, the checkpoint's run config as a dict)."""
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), state["config"]["model"]))
    model_cfg.pretrained = None
    model = build_model(model_cfg)
    apply_model_state(model, state["model"], path)
    return model.eval(), build_tokenizer(model_cfg), {**state["config"], "step": state["step"], "checkpoint": str(path)}
