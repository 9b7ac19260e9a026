"""The curation subcommands of ``contrastive-data``: score, filter, dedup, balance (logic in contrastive.curation).

    torchrun --nproc_per_node=2 -m contrastive.cli.data score data/demo/fashion-mnist/train --model runs/demo \\
        --out curation/scores.parquet
    contrastive-data filter data/demo/fashion-mnist/train --scores curation/scores.parquet \\
        --where "similarity >= 0.25 and language == 'en'" --out curation/filtered
    torchrun --nproc_per_node=2 -m contrastive.cli.data reinforce data/demo/fashion-mnist/train \\
        --teacher demo=runs/demo --augmentations 4 --out data/demo/fashion-mnist-reinforced
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from contrastive.curation import filtering, reinforce, scoring
from contrastive.curation.extra import require
from contrastive.data.reinforced import MANIFEST
from contrastive.data.shards import check_shards_exist, expand_shards
from contrastive.dist import init_distributed, shutdown_distributed
from contrastive.encoders import load_encoder
from contrastive.errors import ConfigError


def command_line(args: argparse.Namespace) -> str:
    return shlex.join(["contrastive-data", *args.argv])


def _shards(pattern: str) -> list[str]:
    urls = expand_shards(pattern)
    check_shards_exist(urls, pattern)
    return urls


def _add_score_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "score", help="score every sample with an encoder: similarity, token count, language (Parquet)",
        description="Write one Parquet table keyed by shard and sample key. Under torchrun each rank scores its "
        "share of the shards; a killed run resumes without rescoring finished shards.",
    )
    parser.add_argument("shards", help="directory, brace pattern, pipe: command or URL; several joined with '::'")
    parser.add_argument("--model", required=True, help="anything load_encoder reads: a run directory or checkpoint "
                        "of ours, an open_clip or transformers directory, or a weights file with --open-clip-name")
    parser.add_argument("--open-clip-name", default=None, help="open_clip model config that --model's weights fit")
    parser.add_argument("--out", type=Path, required=True, help="the Parquet file to write")
    parser.add_argument("--embeddings", action="store_true", help="also store each image embedding")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--min-image-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (each rank its LOCAL_RANK's GPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    for module in ("pyarrow", "py3langid"):
        require(module)
    urls = _shards(args.shards)
    # Ranks meet only at the end, and a resumed run may leave one rank most of the work: wait up to a day there.
    env = init_distributed(args.device, timeout_minutes=24 * 60)
    try:
        encoder = load_encoder(args.model, args.open_clip_name, env.device)
        options = scoring.ScoreOptions(args.batch_size, args.embeddings, args.min_image_size)
        result = scoring.score_shards(urls, encoder, args.out, rank=env.rank, world_size=env.world_size,
                                      barrier=env.collectives.barrier, device=env.device, options=options,
                                      progress=not args.no_progress)
        print(f"rank {env.rank}: scored {result['scored']} shards, {result['resumed']} already done; "
              f"bad samples: {dict(result['skipped']) or 'none'}")
        if env.is_main:
            print(f"wrote {args.out}")
    finally:
        shutdown_distributed()
    return 0


def _add_filter_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "filter", help="keep samples by their scores; write new shards (or a key list) and a manifest",
        description="Keep the samples that pass every --where rule and, with --top-fraction, rank in the best "
        "fraction by similarity; write them as evened-out img2dataset shards with the similarity in each json.",
    )
    parser.add_argument("shards", help="the shards that were scored")
    parser.add_argument("--scores", type=Path, required=True, help="Parquet file from `contrastive-data score`")
    parser.add_argument("--where", default=None,
                        help="rules over the score columns, e.g. \"similarity >= 0.28 and language == 'en'\"")
    parser.add_argument("--top-fraction", type=float, default=None,
                        help="keep only this best fraction of the scored pool by similarity (DataComp's baseline)")
    parser.add_argument("--image-reference", type=Path, default=None,
                        help="scores (with --embeddings, same model) of a reference set, e.g. ImageNet's training "
                        "images: DataComp's image-based filter keeps samples whose k-means cluster holds one")
    parser.add_argument("--clusters", type=int, default=100000, help="k-means clusters for --image-reference")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed")
    parser.add_argument("--out", type=Path, required=True, help="output directory (empty or new)")
    _add_output_arguments(parser)
    parser.set_defaults(run=_run_filter)


def _run_filter(args: argparse.Namespace) -> int:
    require("pyarrow")
    table, metadata = scoring.read_scores(args.scores)
    if args.where is None and args.top_fraction is None and args.image_reference is None:
        raise ConfigError("give --where, --top-fraction, --image-reference or several")
    reference = scoring.read_scores(args.image_reference)[0] if args.image_reference else None
    if reference is not None:
        require("faiss")
    selection = filtering.select(table, args.where, args.top_fraction, reference, args.clusters, args.seed)
    provenance = {"scores": str(args.scores), "model": metadata.get("model"),
                  "model_sha256": metadata.get("model_sha256"), "where": args.where,
                  "top_fraction": args.top_fraction,
                  "image_reference": str(args.image_reference) if args.image_reference else None,
                  "clusters": args.clusters if args.image_reference else None}
    _write_selection(args, _shards(args.shards), selection, provenance)
    return 0


def _add_dedup_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "dedup", help="drop exact and near duplicates, and copies of an evaluation set's images",
        description="Exact duplicates by image content hash; near duplicates through a faiss HNSW index over "
        "image embeddings, at a threshold calibrated on planted transformed copies unless --threshold is given.",
    )
    parser.add_argument("shards", help="directory, brace pattern, pipe: command or URL; several joined with '::'")
    parser.add_argument("--out", type=Path, required=True, help="output directory (empty or new)")
    parser.add_argument("--eval-shards", default=None, help="evaluation shards whose images must not be trained on")
    parser.add_argument("--model", default=None, help="embed with this encoder (load_encoder) instead of "
                        "the default thumbnail descriptor")
    parser.add_argument("--threshold", type=float, default=None, help="cosine similarity at or above which two "
                        "images are copies; default: calibrated on planted copies")
    parser.add_argument("--calibration-samples", type=int, default=512, help="images copied for calibration")
    parser.add_argument("--seed", type=int, default=0)
    _add_output_arguments(parser)
    parser.set_defaults(run=_run_dedup)


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples-per-shard", type=int, default=10000, help="at most this many per output shard")
    parser.add_argument("--keep-list", action="store_true",
                        help="write only the kept keys (keep.txt) and the manifest, no shards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _write_selection(args: argparse.Namespace, urls: list[str], selection, provenance: dict) -> dict:
    manifest = filtering.filter_shards(urls, selection, args.out, samples_per_shard=args.samples_per_shard,
                                       keep_list=args.keep_list, provenance={"command": command_line(args),
                                                                             **provenance},
                                       progress=not args.no_progress)
    print(f"kept {manifest['kept']} of {manifest['scored']} samples")
    for rule in manifest["rules"]:
        print(f"  {rule['rule']}: dropped {rule['dropped']}")
    print(json.dumps(manifest["shards_out"]) if manifest["shards_out"] else f"wrote {manifest['keep_list']}")
    print(f"manifest: {args.out / filtering.MANIFEST_FILE}")
    return manifest


def _run_dedup(args: argparse.Namespace) -> int:
    from contrastive.curation import dedup

    require("faiss")
    urls = _shards(args.shards)
    eval_urls = _shards(args.eval_shards) if args.eval_shards else None
    if args.model:
        encoder = load_encoder(args.model)
        embed, model = dedup.encoder_embedding(encoder), {"model": encoder.source,
                                                          "model_sha256": scoring.model_hash(encoder.source)}
    else:
        embed, model = dedup.thumbnail_embedding, {"model": f"thumbnail {dedup.THUMBNAIL_SIZE}x{dedup.THUMBNAIL_SIZE}"}
    selection, report = dedup.deduplicate(urls, embed, eval_urls=eval_urls, threshold=args.threshold,
                                          calibration_samples=args.calibration_samples, seed=args.seed,
                                          progress=not args.no_progress)
    for name, what in (("calibration", "threshold"), ("eval_calibration", "evaluation-set threshold (crop views)")):
        if name in report:
            calibration = report[name]
            print(f"{what} {calibration['threshold']:.6f} from {calibration['planted']} planted copies: precision "
                  f"{calibration['precision']:.3f}, recall {calibration['recall']:.3f}, false-positive rate on "
                  f"unplanted pairs {calibration['false_positive_rate']:.2e}; recall by transformation "
                  f"{json.dumps({k: round(v, 3) for k, v in calibration['recall_by_transform'].items()})}")
    _write_selection(args, urls, selection, {**model, "eval_shards": eval_urls, "dedup": report})
    return 0


def _add_balance_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "balance", help="MetaCLIP balancing: match captions to metadata entries, sample each down to about t",
        description="Substring-match every caption to the entries (Aho-Corasick); keep a pair when one of its "
        "entries is drawn with probability min(1, t / N_entry); drop pairs that match no entry.",
    )
    parser.add_argument("shards", help="directory, brace pattern, pipe: command or URL; several joined with '::'")
    parser.add_argument("--metadata", type=Path, required=True, help="text file, one entry a line")
    parser.add_argument("--t", type=float, required=True, help="pairs an entry keeps on average (MetaCLIP: 20k)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output directory (empty or new)")
    _add_output_arguments(parser)
    parser.set_defaults(run=_run_balance)


def _run_balance(args: argparse.Namespace) -> int:
    from contrastive.curation import balance

    require("ahocorasick")
    urls = _shards(args.shards)
    entries = balance.read_entries(args.metadata)
    result = balance.balance(urls, entries, args.t, args.seed, progress=not args.no_progress)
    counts = balance.histogram(result, entries)
    for entry, (before, after) in list(counts.items())[:10]:
        print(f"  {entry!r}: {before} -> {after}")
    _write_selection(args, urls, result.selection, {
        "metadata": str(args.metadata), "entries": len(entries), "t": args.t, "seed": args.seed,
        "entry_histogram": counts})
    return 0




def _teacher_argument(value: str) -> tuple[str, str]:
    name, separator, path = value.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"--teacher takes NAME=PATH, got {value!r}")
    return name, path


def _add_reinforce_command(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "reinforce", help="write shards that carry teacher embeddings of stored augmentations (distillation)",
        description="Run the teachers once over the shards and write them again with, per sample, K augmentations' "
        "parameters and each teacher's embeddings of them (and of the caption). Under torchrun each rank writes its "
        "share of the shards; a killed run resumes without redoing finished shards. Prints the size overhead.",
    )
    parser.add_argument("shards", help="directory, brace pattern or list of local shards; several joined with '::'")
    parser.add_argument("--teacher", type=_teacher_argument, action="append", required=True, metavar="NAME=PATH",
                        help="a teacher: anything load_encoder reads; repeat for several")
    parser.add_argument("--open-clip-name", default=None, help="open_clip model config that a weights file fits")
    parser.add_argument("--out", type=Path, required=True, help="the directory for the new shards")
    parser.add_argument("--augmentations", type=int, default=4, help="augmentations per sample (K)")
    parser.add_argument("--crop-scale", type=float, nargs=2, default=[0.9, 1.0], metavar=("LOW", "HIGH"),
                        help="area share of the random resized crops (as data.crop_scale)")
    parser.add_argument("--horizontal-flip", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="the stored embeddings' type")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (each rank its LOCAL_RANK's GPU)")
    parser.set_defaults(run=_run_reinforce)


def _run_reinforce(args: argparse.Namespace) -> int:
    if args.augmentations < 1:
        raise ConfigError(f"--augmentations must be at least 1, got {args.augmentations}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise ConfigError(f"--crop-scale must be LOW HIGH with 0 < LOW <= HIGH <= 1, got {args.crop_scale}")
    urls = _shards(args.shards)
    env = init_distributed(args.device, timeout_minutes=24 * 60)  # ranks meet only at the end
    try:
        teachers = {name: load_encoder(path, args.open_clip_name, env.device) for name, path in args.teacher}
        if len(teachers) < len(args.teacher):
            raise ConfigError("--teacher names must be distinct")
        options = reinforce.ReinforceOptions(args.augmentations, tuple(args.crop_scale), args.horizontal_flip,
                                             args.seed, args.dtype, args.batch_size)
        result = reinforce.reinforce_shards(urls, teachers, args.out, rank=env.rank, world_size=env.world_size,
                                            barrier=env.collectives.barrier, device=env.device, options=options)
        print(f"rank {env.rank}: wrote {result['written']} shards ({result['samples']} samples), "
              f"{result['resumed']} already done; bad samples: {dict(result['skipped']) or 'none'}")
        if env.is_main:
            manifest = json.loads((args.out / MANIFEST).read_text())
            print(f"wrote {args.out}: {manifest['output_bytes']} bytes from {manifest['input_bytes']}, size overhead "
                  f"{100 * manifest['size_overhead']:.1f}% ({args.augmentations} augmentations, {args.dtype})")
    finally:
        shutdown_distributed()
    return 0


COMMANDS = (_add_score_command, _add_filter_command, _add_dedup_command, _add_balance_command, _add_reinforce_command)
