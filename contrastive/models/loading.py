"""Rebuilding a trained model (and its tokenizer) from a checkpoint of ours, for evaluation and export."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from torch import nn

from contrastive.checkpoint_io import apply_model_state, load_checkpoint, resolve_checkpoint
from contrastive.config import ModelConfig
from contrastive.models import build_model, build_tokenizer


def load_trained_model(path: str | Path) -> tuple[nn.Module, object, dict]:
    """(model in eval mode, tokenizer, the checkpoint's run config as a dict); `path` is a checkpoint file or a run
    directory (its newest checkpoint)."""
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), state["config"]["model"]))
    model_cfg.pretrained = None
    model = build_model(model_cfg)
    apply_model_state(model, state["model"], path)
    return model.eval(), build_tokenizer(model_cfg), {**state["config"], "step": state["step"], "checkpoint": str(path)}
