"""open_clip format: `open_clip_config.json` + `open_clip_model.safetensors`, the layout of open_clip's hub models.

Load with `open_clip.create_model_and_transforms("local-dir:EXPORT_DIR")`, or push the directory to the hub
and use `hf-hub:ORG/NAME`; tools built on open_clip (clip_benchmark) pass such a name through. Our two-tower
models wrap open_clip's `CLIP` as `.clip` and CoCa wraps open_clip's `CoCa` as `.coca`, so the weights are the
wrapped module's state dict as is. CapPa has no open_clip counterpart.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import open_clip
from open_clip.model import CLIPTextCfg
from safetensors.torch import save_file
from torch import nn

from contrastive.encoders import preprocess_from_config
from contrastive.errors import ConfigError
from contrastive.export.base import EXPORT_FORMATS, Exported
from contrastive.models import timm_towers
from contrastive.models.towers import tower_configs

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def open_clip_model_config(model: nn.Module) -> tuple[nn.Module, dict]:
    """(the wrapped open_clip module, its open_clip model_cfg)."""
    cfg = model.cfg
    embed_dim, vision, text = tower_configs(cfg)
    model_cfg = {"embed_dim": embed_dim, "quick_gelu": cfg.quick_gelu}
    if cfg.arch == "clip":
        module = model.clip
        base = open_clip.get_model_config(cfg.open_clip_name) if cfg.open_clip_name else {}
        if base.get("custom_text"):
            model_cfg["custom_text"] = True
        if module.logit_bias is not None:
            # Only its presence matters: the weights file holds the trained value.
            model_cfg["init_logit_bias"] = float(module.logit_bias.detach().reshape(-1)[0])
    elif cfg.arch == "coca":
        from contrastive.models.coca import NaFlexAttentionalPooling, multimodal_config

        module = model.coca
        if isinstance(module.visual, NaFlexAttentionalPooling):
            raise ConfigError("model.arch=coca on a NaFlex tower has no open_clip counterpart (open_clip's CoCa has "
                              "no attentional pooler after a timm tower); evaluate the run directory itself "
                              "(contrastive-eval --checkpoint RUN_DIR)")
        vision = {**vision, "attentional_pool": True, "output_tokens": True}
        text = {**text, "embed_cls": True, "output_tokens": True}
        model_cfg["multimodal_cfg"] = dataclasses.asdict(multimodal_config(cfg.decoder, CLIPTextCfg(**text), embed_dim))
        model_cfg["custom_text"] = True  # how open_clip's factory picks CoCa (with multimodal_cfg present)
    else:
        raise ConfigError(f"model.arch={cfg.arch!r} has no open_clip counterpart "
                          f"(open_clip has CLIP, SigLIP and CoCa); "
                          f"use --format bundle or --format transformers for its image tower")
    model_cfg["vision_cfg"], model_cfg["text_cfg"] = vision, text
    return module, model_cfg


@EXPORT_FORMATS.register("open_clip")
def export_open_clip(model: nn.Module, out: Path) -> Exported:
    module, model_cfg = open_clip_model_config(model)
    preprocess = preprocess_from_config(model.cfg)
    preprocess_cfg = {"size": preprocess.image_size, "mean": preprocess.mean, "std": preprocess.std,
                      "interpolation": preprocess.interpolation, "resize_mode": "shortest"}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file({name: tensor.detach().contiguous() for name, tensor in module.state_dict().items()},
              str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return Exported(
        format="open_clip",
        architecture=f"open_clip `{type(module).__name__}` (embed_dim {model_cfg['embed_dim']})",
        usage=("import open_clip\n"
               + ("import contrastive.models  # registers the timm tower this model uses\n"
                  if model_cfg["vision_cfg"].get("timm_model_name") in timm_towers.default_cfgs else "")
               + "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:EXPORT_DIR')\n"
               "tokenizer = open_clip.get_tokenizer('local-dir:EXPORT_DIR')"),
    )
