"""Training objectives. Each is a small module with one interface: loss(output, batch, collectives) -> LossOutput."""

from contrastive.losses.registry import LOSSES, build_loss, list_losses
from contrastive.losses import clip  # noqa: F401  (registers "clip")
from contrastive.losses import cappa, coca  # noqa: F401  (register "cappa", "coca")
from contrastive.losses import siglip  # noqa: F401  (registers "siglip")

__all__ = ["LOSSES", "build_loss", "list_losses"]
