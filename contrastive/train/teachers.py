"""Distillation teachers: loaded through the one encoder-loading API (contrastive.encoders.load_encoder), frozen,
run without gradients (in bf16 where asked), sharded per block under dist.strategy=fsdp; each sees the batch's
teacher view (the student's augmentation cut at the teacher resolution) in its own preprocessing, and the captions
through its own tokenizer.

A teacher's hash (contrastive.encoders.weights_hash) goes into every checkpoint; a resume with a
different teacher is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from contrastive.config import DistillationConfig, TeacherConfig
from contrastive.data.transforms import teacher_input
from contrastive.dist import DistEnv
from contrastive.dist.parallel import shard_frozen
from contrastive.encoders import LoadedEncoder, load_encoder, weights_hash
from contrastive.errors import ConfigError, InputError
from contrastive.models.distillation_heads import captured_patch_tokens
from contrastive.types import Batch, TeacherTargets

log = logging.getLogger(__name__)


def load_teacher(cfg: TeacherConfig, device: torch.device) -> LoadedEncoder:
    try:
        encoder = load_encoder(cfg.path, open_clip_name=cfg.open_clip_name, device=device)
    except (InputError, ValueError) as error:
        raise InputError(f"loss.distillation teacher {cfg.name!r}: {error}") from None
    encoder.model.requires_grad_(False)
    return encoder


@dataclass
class Teacher:
    name: str
    encoder: LoadedEncoder
    digest: str
    patch_width: int | None  # the width of its patch tokens, where patch terms are on


class Teachers:
    """The run's teachers; `targets(batch)` runs them on a batch's teacher view and captions."""

    def __init__(self, cfg: DistillationConfig, env: DistEnv, strategy: str) -> None:
        self.cfg, self.env = cfg, env
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
        self.teachers: list[Teacher] = []
        for teacher_cfg in cfg.teachers:
            encoder = load_teacher(teacher_cfg, env.device)
            if cfg.contrastive_weight or cfg.sigmoid_weight:
                if not encoder.has_text_tower or encoder.logit_scale is None:
                    raise ConfigError(f"loss.distillation teacher {teacher_cfg.name!r} has no text tower and "
                                      "temperature: it can serve feature terms only (contrastive_weight and "
                                      "sigmoid_weight need both)")
            if cfg.sigmoid_weight and encoder.logit_bias is None:
                raise ConfigError(f"loss.distillation.sigmoid_weight needs SigLIP teachers (a logit bias); "
                                  f"{teacher_cfg.name!r} has none")
            patch_width = self._patch_width(encoder) if cfg.patch_weight else None
            digest = weights_hash(encoder.model)  # before sharding: the whole weights
            if strategy == "fsdp" and env.world_size > 1:
                shard_frozen(encoder.model, bf16=self.bf16, methods=("encode_image", "encode_text"))
            self.teachers.append(Teacher(teacher_cfg.name, encoder, digest, patch_width))
        largest = max(self.teachers, key=lambda t: t.encoder.preprocess.image_size)
        # The teachers' view is cut once, at the largest teacher's size; smaller teachers resize it.
        self.view = (largest.encoder.preprocess.image_size, largest.encoder.preprocess.interpolation)

    @staticmethod
    def _patch_width(encoder: LoadedEncoder) -> int:
        visual = getattr(encoder.model, "visual", None)
        with captured_patch_tokens(visual):  # refuses towers without patch tokens
            pass
        return visual.transformer.width

    @property
    def hashes(self) -> dict[str, str]:
        return {teacher.name: teacher.digest for teacher in self.teachers}

    def widths(self) -> dict[str, tuple[int, int | None]]:
        """name -> (pooled width, patch token width or None): what the student's adaptor heads map into."""
        widths = {}
        for teacher in self.teachers:
            size = teacher.encoder.preprocess.image_size
            probe = torch.zeros(1, 3, size, size, device=self.env.device)
            with torch.no_grad():
                widths[teacher.name] = (self._encode(teacher, probe)[0].shape[-1], teacher.patch_width)
        return widths

    def _encode(self, teacher: Teacher, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        model = teacher.encoder.model
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if teacher.patch_width is None:
                return model.encode_image(images).float(), None
            with captured_patch_tokens(model.visual) as captured:
                features = model.encode_image(images).float()
            return features, captured["tokens"].float()

    @torch.no_grad()
    def targets(self, batch: Batch) -> dict[str, TeacherTargets]:
        if batch.teacher_images is None:
            raise ConfigError("online distillation needs the teachers' view in every batch (the trainer's loader "
                              "adds it); a reinforced data set needs loss.distillation.reinforced=true")
        targets = {}
        for teacher in self.teachers:
            encoder = teacher.encoder
            image_features, tokens = self._encode(teacher, teacher_input(batch.teacher_images, encoder.preprocess))
            text_features = None
            if encoder.has_text_tower and (self.cfg.contrastive_weight or self.cfg.sigmoid_weight):
                text_tokens = encoder.tokenizer(batch.captions).to(self.env.device)
                with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    text_features = encoder.model.encode_text(text_tokens).float()
            targets[teacher.name] = TeacherTargets(
                image_features=image_features, text_features=text_features,
                logit_scale=None if encoder.logit_scale is None else torch.tensor(encoder.logit_scale,
                                                                                   device=self.env.device),
                logit_bias=None if encoder.logit_bias is None else torch.tensor(encoder.logit_bias,
                                                                                 device=self.env.device),
                patch_tokens=tokens)
        return targets


def check_resumed_teachers(saved: dict[str, str], current: dict[str, str]) -> None:
    """Refuse a resume whose teachers differ from the checkpoint's (by name and weights hash)."""
    if saved != current:
        raise ConfigError(f"resume refused: the checkpoint was trained with teachers {saved}, this run has "
                          f"{current}; distil from the same teachers or start a new run (another name=)")
