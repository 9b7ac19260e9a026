"""Our models as LoadedEncoders: from a checkpoint file or run directory, or from a model already in memory."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from contrastive.checkpoint_io import apply_model_state, load_checkpoint, resolve_checkpoint
from contrastive.config import ModelConfig
from contrastive.data.transforms import Preprocess
from contrastive.encoders.encoder import LoadedEncoder, parameter_value
from contrastive.errors import InputError
from contrastive.models import build_model, build_tokenizer
from contrastive.models.naflex import naflex_patch_size
from contrastive.models.towers import model_image_size, tower_configs


def preprocess_from_config(cfg: ModelConfig) -> Preprocess:
    """The eval-time preprocessing of a model built from `cfg` (training crops at random instead)."""
    patch_size = naflex_patch_size(tower_configs(cfg)[1].get("timm_model_name"))
    return Preprocess(model_image_size(cfg), list(cfg.image_mean), list(cfg.image_std), cfg.interpolation,
                      patch_size)


def encoder_from_model(model: nn.Module, name: str = "model", source: str = "",
                       run_config: dict | None = None) -> LoadedEncoder:
    """An in-memory model of ours (it has `.cfg`), as the trainer hands it to its evaluators. The logit scale is
    read now: a model still training changes it later."""
    scale = model.logit_scale() if callable(getattr(model, "logit_scale", None)) else None
    return LoadedEncoder(
        model=model,
        preprocess=preprocess_from_config(model.cfg),
        tokenizer=build_tokenizer(model.cfg),
        kind="contrastive",
        name=name,
        source=source,
        logit_scale=None if scale is None else float(scale.detach()),
        logit_bias=parameter_value(model, "logit_bias"),
        run_config=run_config or {},
    )


WEIGHTS = ("model", "ema")  # a checkpoint's trained weights, or their exponential moving average
TRAINING_ONLY_PREFIXES = ("self_distillation.", "distillation_heads.")


def load_checkpoint_encoder(path: str | Path, device: torch.device, weights: str = "model") -> LoadedEncoder:
    """A checkpoint file or sharded checkpoint directory, or a run directory (its newest checkpoint); `weights`
    one of WEIGHTS."""
    if weights not in WEIGHTS:
        raise InputError(f"weights={weights!r} is not one of {', '.join(WEIGHTS)}")
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    if weights == "ema":
        if "ema" not in state:
            raise InputError(f"{path} holds no EMA weights (the run had trainer.ema.decay=null)")
        state["model"] = {**state["model"], **state["ema"]}  # trained weights averaged; frozen ones and buffers kept
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), state["config"]["model"]))
    cfg.pretrained = None  # the checkpoint holds every weight; the run's starting point may not exist here
    model = build_model(cfg)
    # Self-distillation's heads, mask token and teacher (contrastive.models.self_distillation) and distillation's
    # adaptor heads (contrastive.models.distillation_heads) serve training only.
    model_state = {k: v for k, v in state["model"].items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    apply_model_state(model, model_state, path)
    run_config = {**state["config"], "step": state["step"], "checkpoint": str(path), "weights": weights,
                  **{key: state[key] for key in ("samples_seen", "git_commit") if key in state}}
    name = str(run_config.get("name", "model")) + ("-ema" if weights == "ema" else "")
    return encoder_from_model(model.to(device).eval(), name, str(path), run_config)
