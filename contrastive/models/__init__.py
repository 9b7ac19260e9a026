"""Models: two-tower contrastive (CLIP / SigLIP) and captioning models, built from typed configs."""

# Imported for their registrations: two_tower registers "clip", cappa and coca their own names, timm_towers the
# SigLIP towers timm lacks (in timm's registry, for model.vision.timm_model_name), locca "siglip_locca".
from contrastive.models import cappa, coca, locca, timm_towers, two_tower  # noqa: F401
from contrastive.models.build import MODELS, build_model, list_models
from contrastive.models.tokenizer import build_tokenizer

__all__ = ["MODELS", "build_model", "build_tokenizer", "list_models"]
