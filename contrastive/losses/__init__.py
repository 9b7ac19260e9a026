"""Training objectives. Each is a small module with one interface: loss(output, batch, collectives) -> LossOutput."""

# Imported for their registrations: each module registers its loss under its own name.
from contrastive.losses import cappa, clip, coca, locca, siglip  # noqa: F401
from contrastive.losses.registry import LOSSES, build_loss, list_losses

__all__ = ["LOSSES", "build_loss", "list_losses"]
