"""Models: two-tower contrastive (CLIP / SigLIP) and captioning models, built from typed configs."""

from contrastive.models.build import MODELS, build_model, list_models
from contrastive.models.tokenizer import build_tokenizer
from contrastive.models import two_tower  # noqa: F401  (registers "clip")
from contrastive.models import cappa, coca  # noqa: F401  (register "cappa", "coca")

__all__ = ["MODELS", "build_model", "build_tokenizer", "list_models"]
