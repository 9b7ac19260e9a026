"""`contrastive-checkpoint convert`: a single-file checkpoint to a sharded (DCP) directory, or back.

    contrastive-checkpoint convert runs/big/checkpoints/step_00020000 big_step_20000.pt
    contrastive-checkpoint convert runs/small/checkpoints/step_00000400.pt small_step_400

The direction follows the source: a directory becomes a file, a file a directory. Either result resumes training
(resume=PATH) and loads in contrastive-eval and contrastive-export. Converting to one file gathers the whole
state in this process's memory.
"""

from __future__ import annotations

import argparse
import sys

from contrastive.errors import ConfigError
from contrastive.train.checkpoint import convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastive-checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    converting = commands.add_parser("convert", help="single file <-> sharded directory")
    converting.add_argument("source", help="a checkpoint file (step_N.pt) or sharded checkpoint directory (step_N)")
    converting.add_argument("destination", help="the path to write (must not exist)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = convert(args.source, args.destination)
    except ConfigError as error:
        print(f"contrastive-checkpoint {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {'sharded checkpoint' if written.is_dir() else 'checkpoint file'} {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
