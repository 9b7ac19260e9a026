"""Export trained encoders for downstream VLM stacks: transformers, open_clip and our own encoder bundle.

    export_checkpoint("runs/demo", "transformers", "exports/demo-hf")
    encoder = load_vision_encoder("exports/demo-bundle")  # patch tokens for a connector, pooled embedding

Every export directory also gets a README.md model card.
"""

from __future__ import annotations

from pathlib import Path

from contrastive.encoders import detect_kind, load_encoder, preprocess_from_config
from contrastive.errors import InputError
from contrastive.export import open_clip_format, transformers_format  # noqa: F401  (register formats)
from contrastive.export.base import EXPORT_FORMATS, Exported, prepare_output_dir
from contrastive.export.bundle import VisionEncoder, VisionEncoderOutput, load_vision_encoder
from contrastive.export.model_card import model_card


def list_formats() -> list[str]:
    return EXPORT_FORMATS.names()


def export_checkpoint(checkpoint: str | Path, format: str, out: str | Path, overwrite: bool = False,
                      weights: str = "model") -> Exported:
    """Checkpoint file, sharded checkpoint directory or run directory -> `out` in the chosen format, with a model
    card. `weights`: the trained weights ("model") or their exponential moving average ("ema")."""
    exporter = EXPORT_FORMATS.get(format)
    kind = detect_kind(Path(checkpoint))
    if kind != "contrastive":
        raise InputError(f"{checkpoint} holds a model in {kind} format; export takes checkpoints of ours (a .pt "
                         f"file or a run directory)")
    encoder = load_encoder(checkpoint, weights=weights)
    model, run = encoder.model, encoder.run_config
    created = not Path(out).exists()
    out = prepare_output_dir(out, overwrite)
    try:
        exported = exporter(model, out)
    except ValueError:
        if created and not any(out.iterdir()):
            out.rmdir()  # a refused tower leaves nothing behind
        raise
    (out / "README.md").write_text(model_card(exported, run, preprocess_from_config(model.cfg)))
    return exported


__all__ = ["EXPORT_FORMATS", "Exported", "VisionEncoder", "VisionEncoderOutput", "export_checkpoint", "list_formats",
           "load_vision_encoder"]
