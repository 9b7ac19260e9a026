"""Training stages (trainer.stages): the image size and text length each step trains at.

CLIPA and Perception Encoder pretrain most steps on low-resolution images and short texts, then finish at full
size, for a fraction of the FLOPs. Parameters never change size (contrastive.models.input_size resamples position
embeddings in the forward pass), so only the data changes: the trainer rebuilds its loader at each stage boundary
from the exact stream positions it holds (as a resume would), and a resumed run starts in the stage of its step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from contrastive.config import TrainConfig, require
from contrastive.data.transforms import Preprocess
from contrastive.models.tokenizer import Tokenizer
from contrastive.models.towers import square_side, tower_configs


@dataclass(frozen=True)
class Stage:
    """Steps [first_step, end_step) train on images of `image_size` pixels and texts of `context_length` tokens."""

    index: int
    first_step: int
    end_step: int
    image_size: int
    context_length: int

    def preprocess(self, model_preprocess: Preprocess) -> Preprocess:
        return replace(model_preprocess, image_size=self.image_size)

    def tokenizer(self, model_tokenizer: Tokenizer) -> Tokenizer:
        """Captions tokenized to this stage's length; open_clip's tokenizers end a cut caption with its EOT token."""
        return partial(model_tokenizer, context_length=self.context_length)

    def describe(self) -> str:
        return (f"stage {self.index}: steps {self.first_step}-{self.end_step - 1}, images {self.image_size} px, "
                f"texts {self.context_length} tokens")


def build_stages(cfg: TrainConfig) -> list[Stage]:
    """The stages covering steps 0 to trainer.max_steps (one, at the model's sizes, without trainer.stages); raises
    ConfigError for a size the towers cannot take."""
    _, vision, text = tower_configs(cfg.model)
    vision_cfg, text_cfg = CLIPVisionCfg(**vision), CLIPTextCfg(**text)
    model_size = square_side(vision_cfg.image_size, "model.vision.image_size")
    # Cutting padding leaves a text feature unchanged only when no real token sees the padding (a causal mask) and
    # the feature is read at the end-of-text token; SigLIP's towers (no mask, pooled at the last position) are not.
    require(not cfg.data.length_bucketing or (not text_cfg.no_causal_mask and text_cfg.pool_type == "argmax"),
            "data.length_bucketing needs a causal text tower pooled at its end-of-text token (pool_type=argmax); "
            f"this one has no_causal_mask={text_cfg.no_causal_mask}, pool_type={text_cfg.pool_type!r}")
    max_steps = cfg.trainer.max_steps
    stages, first_step = [], 0
    for index, stage in enumerate(cfg.trainer.stages):
        image_size = stage.image_size or model_size
        context_length = stage.context_length or text_cfg.context_length
        patch = vision_cfg.patch_size if not vision_cfg.timm_model_name else 1  # timm checks its own patches
        require(image_size % patch == 0, f"trainer.stages[{index}].image_size={image_size} is not a multiple of "
                f"the patch size {patch}")
        require(0 < context_length <= text_cfg.context_length, f"trainer.stages[{index}].context_length="
                f"{context_length} must be in [1, {text_cfg.context_length}] (the model's context length)")
        end_step = min(max_steps, math.ceil(stage.until * max_steps - 1e-9))
        if end_step > first_step:
            stages.append(Stage(len(stages), first_step, end_step, image_size, context_length))
            first_step = end_step
    if first_step < max_steps:
        stages.append(Stage(len(stages), first_step, max_steps, model_size, text_cfg.context_length))
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage step `step` (0-based: the step about to run) trains in; the last for steps past the end."""
    return next((stage for stage in stages if step < stage.end_step), stages[-1])
