"""`contrastive-export`: a checkpoint of ours -> files a downstream VLM stack loads.

    contrastive-export --checkpoint runs/demo --format transformers --out exports/demo-hf
    contrastive-export --checkpoint runs/demo/checkpoints/step_00000400.pt --format open_clip --out exports/demo-oc
    contrastive-export --checkpoint runs/demo --format bundle --out exports/demo-bundle

--checkpoint takes a checkpoint file, a sharded checkpoint directory (step_N/) or a run directory (its newest
checkpoint, of either format). --weights ema exports the run's EMA weights (trainer.ema.decay). Formats:
  transformers  CLIPVisionModel[WithProjection] (class-token towers) or SiglipVisionModel (timm 'map' towers),
                plus preprocessor_config.json; towers transformers cannot express are refused with the reason
  open_clip     open_clip_config.json + open_clip_model.safetensors: create_model_and_transforms('local-dir:OUT')
  bundle        vision.safetensors + encoder.json: contrastive.export.load_vision_encoder(OUT)
Every export gets a README.md model card with the run's training recipe and evaluation results.
"""

from __future__ import annotations

import argparse
import sys

from contrastive.encoders.ours import WEIGHTS
from contrastive.errors import ConfigError
from contrastive.export import export_checkpoint, list_formats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastive-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or directory, or run directory")
    parser.add_argument("--weights", default="model", choices=WEIGHTS,
                        help="the trained weights (model) or their exponential moving average (ema)")
    parser.add_argument("--format", required=True, choices=list_formats())
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        exported = export_checkpoint(args.checkpoint, args.format, args.out, overwrite=args.overwrite,
                                     weights=args.weights)
    except ConfigError as error:
        print(f"contrastive-export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {exported.architecture} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
