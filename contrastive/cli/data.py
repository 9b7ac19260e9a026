"""``contrastive-data``: dataset tools on the command line, one subcommand each.

    contrastive-data demo [--source DIR] [--out DIR] [--samples-per-shard N] [--seed S] [--limit N] [--image-size PX]
    contrastive-data demo --grounding [--source DIR] [--out DIR] [--seed S] [--train-canvases N] [--test-canvases N]
        [--canvas-size PX]
    contrastive-data inspect SHARDS [--min-image-size N] [--json PATH] [--write-stats]
    contrastive-data validate SHARDS [--min-image-size N]
    [torchrun ...] contrastive-data score SHARDS --model PATH --out SCORES [--embeddings] [--batch-size N]
    contrastive-data filter SHARDS --scores SCORES [--where EXPR] [--top-fraction F] --out DIR [--keep-list]
    contrastive-data dedup SHARDS --scores SCORES --out DIR [--eval-shards SHARDS] [--threshold T]
    contrastive-data balance SHARDS --metadata ENTRIES --t T --out DIR [--seed S]

SHARDS is what data.sources.N.shards takes: a directory or an s3:// / gs:// prefix, a brace pattern, `pipe:`
commands, or s3:// gs:// http(s):// URLs (the `s3` extra), several joined with '::'.

To add a subcommand, write an ``_add_<name>_command(subcommands)`` that registers its parser and sets
``run`` to a function ``(args) -> exit code``, and list it in ``_COMMANDS``. A ConfigError (contrastive.errors)
raised by a command is a user mistake: it is printed as one line and the exit code is 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

from contrastive.cli import curation_commands
from contrastive.data import demo, grounding
from contrastive.data.remote import check_remote_shards_readable, write_stats_file
from contrastive.data.shard_report import ShardReport, inspect_shards
from contrastive.data.shards import expand_shards
from contrastive.errors import ConfigError


def _add_demo_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "demo",
        help="build the offline demo dataset (Fashion-MNIST as webdataset shards)",
        description="Write Fashion-MNIST (or scikit-learn's digits when it is absent) as img2dataset-style "
        "webdataset shards with captions, plus clip_benchmark's wds files for zero-shot evaluation.",
    )
    parser.add_argument(
        "--source",
        default=None,
        help=f"directory holding the four Fashion-MNIST idx files (gzipped or not), or '{demo.DIGITS_SOURCE}'; "
        f"default: the first of {', '.join(map(str, demo.default_fashion_mnist_dirs()))} that holds them, "
        "else scikit-learn's digits",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory; default data/demo/fashion-mnist (data/demo/grounding with --grounding)")
    parser.add_argument(
        "--samples-per-shard", type=int, default=5000, help="train samples per shard; test shards hold half"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing each caption's template")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N samples of each split")
    parser.add_argument("--image-size", type=int, default=None,
                        help="upsample every image to this square side (bicubic); default: the source's 28 px")
    parser.add_argument("--grounding", action="store_true",
                        help="build the grounding canvases instead: 2-4 items per canvas with boxes, phrases and masks")
    parser.add_argument("--train-canvases", type=int, default=2000, help="with --grounding: train canvases")
    parser.add_argument("--test-canvases", type=int, default=500, help="with --grounding: held-out canvases")
    parser.add_argument("--canvas-size", type=int, default=64, help="with --grounding: canvas side in pixels")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    if args.grounding:
        return _run_grounding_demo(args)
    dataset = demo.build_demo_dataset(
        args.out or Path("data/demo/fashion-mnist"),
        source=args.source,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        limit=args.limit,
        image_size=args.image_size,
    )
    if dataset.fell_back:
        print(
            f"NOTE: Fashion-MNIST was not found in {' or '.join(map(str, demo.default_fashion_mnist_dirs()))}; "
            "this demo dataset holds scikit-learn's 8x8 digits upsampled to 28x28 instead. For the real data "
            "install the Debian package dataset-fashion-mnist or pass --source DIR, and build into a fresh --out."
        )
    source = f"{dataset.source} ({dataset.source_path})" if dataset.source_path else dataset.source
    print(f"demo dataset at {dataset.root}, from {source}")
    print(f"  train: {dataset.train_count} samples in {dataset.train_shard_count} shards")
    print(f"  test:  {dataset.test_count} samples in {dataset.test_shard_count} shards")
    print(f"  {len(dataset.classnames)} classes: {', '.join(dataset.classnames)}")
    print("train shards to pass to the trainer:")
    print(f"  {dataset.train_shards}")
    return 0


def _run_grounding_demo(args: argparse.Namespace) -> int:
    root = grounding.build_grounding_dataset(
        args.out or Path("data/demo/grounding"), source=args.source, seed=args.seed,
        train_canvases=args.train_canvases, test_canvases=args.test_canvases, canvas_size=args.canvas_size,
    )
    description = grounding.grounding_description(root)
    if description["source"]["fell_back"]:
        print(
            f"NOTE: Fashion-MNIST was not found in {' or '.join(map(str, demo.default_fashion_mnist_dirs()))}; "
            "these canvases hold scikit-learn's 8x8 digits upsampled to 28x28 instead. For the real data "
            "install the Debian package dataset-fashion-mnist or pass --source DIR, and build into a fresh --out."
        )
    size = description["parameters"]["canvas_size"]
    print(f"grounding dataset at {root}, from {description['source']['name']}, {size}x{size} canvases")
    for split in grounding.GROUNDING_SPLITS:
        print(f"  {split}: {description['splits'][split]['count']} canvases: {grounding.split_shards(root, split)}")
    return 0


def _add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="directory, brace pattern, pipe: command or URL; several joined with '::'")
    parser.add_argument("--min-image-size", type=int, default=8,
                        help="a smaller image side counts as a bad sample (as data.min_image_size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_inspect_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "inspect", help="count samples, extensions, image sizes and caption lengths; list bad samples",
        description="Read every sample once with the training stream's checks and describe the shard set.",
    )
    _add_shard_arguments(parser)
    parser.add_argument("--json", type=Path, default=None, help="also write the counts as JSON here")
    parser.add_argument("--write-stats", action="store_true",
                        help="write each directory's or prefix's samples per shard to _stats.json beside the shards, "
                        "where a finite training run reads its shard sizes")
    parser.set_defaults(run=_run_inspect)


def _add_validate_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "validate", help="exit non-zero when any shard or sample is bad",
        description="Read every sample once with the training stream's checks; exit 1 if any is bad.",
    )
    _add_shard_arguments(parser)
    parser.set_defaults(run=_run_validate)


def _inspect(args: argparse.Namespace) -> ShardReport:
    urls = expand_shards(args.shards)
    check_remote_shards_readable(urls, args.shards)  # missing local shards are counted as unreadable, like training
    report = inspect_shards(urls, args.min_image_size, progress=not args.no_progress)
    print("\n".join(report.summary()))
    return report


def _run_inspect(args: argparse.Namespace) -> int:
    report = _inspect(args)
    if args.json:
        counts = {"shards": report.shards, "samples": report.samples, "good": report.good,
                  "extensions": dict(report.extensions), "bad": dict(report.skipped),
                  "bad_samples": [list(entry) for entry in report.bad_samples],
                  "samples_with_boxes": sum(1 for count in report.boxes_per_sample if count),
                  "boxes": sum(report.boxes_per_sample), "boxes_past_the_image": report.boxes_past_the_image}
        args.json.write_text(json.dumps(counts, indent=2) + "\n")
    if args.write_stats:
        by_directory: dict[str, dict[str, int]] = defaultdict(dict)
        for url, samples in report.samples_per_shard.items():
            directory, _, name = url.rpartition("/")
            by_directory[directory][name] = samples
        for directory, samples in by_directory.items():
            print(f"wrote {write_stats_file(directory, samples)} ({len(samples)} shards)")
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    report = _inspect(args)
    print("valid" if report.ok else f"INVALID: {sum(report.skipped.values())} bad samples or shards")
    return 0 if report.ok else 1


_COMMANDS = (_add_demo_command, _add_inspect_command, _add_validate_command, *curation_commands.COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastive-data", description="Build and check contrastive datasets.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as given, for provenance records
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"contrastive-data {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
