"""`contrastive-eval`: evaluate checkpoints of ours or open_clip models (local weights) on local datasets.

    contrastive-eval zeroshot --checkpoint runs/demo --dataset-root data/demo/fashion-mnist \\
        --output runs/demo/zeroshot.json
    contrastive-eval zeroshot --checkpoint runs/a runs/b --open-clip ViT-B-32 weights/vit_b_32.pt \\
        --dataset-root data/imagenet --classnames imagenet1k --templates openai_imagenet --output-dir results/
    contrastive-eval retrieval --checkpoint runs/demo --dataset-root data/flickr30k --output-dir results/
    contrastive-eval probe --checkpoint runs/demo --dataset-root data/demo/fashion-mnist --train-split train
    contrastive-eval dense --checkpoint runs/demo_siglip2 export/bundle --dataset-root data/demo/grounding
    contrastive-eval zeroshot --checkpoint runs/naflex --dataset-root data/demo/fashion-mnist --seq-len 16,36,64 \
        --output-dir results/
    contrastive-eval caption --checkpoint runs/demo_cappa --dataset-root data/demo/fashion-mnist --count 100
    contrastive-eval report --checkpoint runs/demo --dataset-root data/demo/fashion-mnist --out runs/demo/report.html
    contrastive-eval grounding --checkpoint runs/demo_siglip_locca --dataset-root data/demo/grounding

Models: --checkpoint takes checkpoint files or run directories (their newest checkpoint), open_clip directories
(open_clip_config.json + weights) or transformers directories (config.json + preprocessor_config.json; image-only
ones are for `probe` and `dense`; `dense` also reads encoder bundles, contrastive-export --format bundle);
--open-clip NAME WEIGHTS (repeatable) an open_clip config name and a local weights file.
Datasets: clip_benchmark's wds layout (ROOT/SPLIT/*.tar; .cls labels, classnames.txt,
zeroshot_classification_templates.txt; for retrieval, .txt with one caption per line) or, for classification, an
image folder ROOT/SPLIT/CLASS/*.jpg. --classnames / --templates take a file or a built-in list (imagenet1k, cifar10,
cifar100 / openai_imagenet, simple).
Every (model, dataset) pair gives one clip_benchmark-shaped JSON in --output-dir, plus summary.csv there;
--output names the JSON file when there is one pair. --seq-len L1,L2,... (NaFlex checkpoints) evaluates each model at
each sequence length, images keeping their aspect ratio; each result records its `seq_len`.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import torch

from contrastive.encoders import load_encoder
from contrastive.encoders.loading import BUNDLE_FILE
from contrastive.encoders.naflex import at_seq_len
from contrastive.encoders.ours import WEIGHTS
from contrastive.errors import ConfigError
from contrastive.eval.captioning import caption_dataset, named_class
from contrastive.eval.datasets import open_classification_dataset
from contrastive.eval.dense import DenseProbeEvaluation
from contrastive.eval.grounding import ProbeSettings, evaluate_grounding
from contrastive.eval.linear_probe import LinearProbeEvaluation
from contrastive.eval.report import write_report
from contrastive.eval.retrieval import ZeroShotRetrieval
from contrastive.eval.zeroshot import ZeroShotClassification, result_record, write_result
from contrastive.export import load_vision_encoder

TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval", "probe": "linear_probe",
         "dense": "dense_probe"}


def _model_specs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(path, open_clip config name or None) per model, as load_encoder takes them."""
    specs = [(path, None) for path in args.checkpoint or []]
    specs += [(weights, name) for name, weights in args.open_clip or []]
    if not specs:
        raise ConfigError("give at least one model: --checkpoint PATH or --open-clip NAME WEIGHTS")
    return specs


def _evaluators(args: argparse.Namespace) -> list:
    if args.dataset_name and len(args.dataset_root) > 1:
        raise ConfigError("--dataset-name needs a single --dataset-root")
    common = {"batch_size": args.batch_size, "num_workers": args.workers, "progress": not args.no_progress}
    if args.command == "zeroshot":
        return [ZeroShotClassification(args.dataset_name, root, args.split, classnames=args.classnames,
                                       templates=args.templates, **common) for root in args.dataset_root]
    if args.command == "probe":
        return [LinearProbeEvaluation(args.dataset_name, root, args.split, args.train_split, **common)
                for root in args.dataset_root]
    if args.command == "dense":
        return [DenseProbeEvaluation(args.dataset_name, root, args.split, args.train_split, args.batch_size,
                                     args.feature_layer, args.image_size, common["progress"])
                for root in args.dataset_root]
    return [ZeroShotRetrieval(args.dataset_name, root, args.split, **common) for root in args.dataset_root]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def result_filename(record: dict) -> str:
    length = f"__len{record['seq_len']}" if "seq_len" in record else ""
    return (f"{_slug(record['model'])}-{_slug(Path(record['pretrained']).stem)}__{_slug(record['dataset'])}"
            f"{length}.json")


def write_summary(path: Path, records: list[dict]) -> None:
    metrics = list(dict.fromkeys(name for record in records for name in record["metrics"]))
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["model", "pretrained", "dataset", "task", "seq_len", *metrics])
        for r in records:
            writer.writerow([r["model"], r["pretrained"], r["dataset"], r["task"], r.get("seq_len", ""),
                             *(f"{r['metrics'][m]:.6f}" if m in r["metrics"] else "" for m in metrics)])


def _evaluate(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    specs = _model_specs(args)
    evaluators = _evaluators(args)  # opened first, so a bad dataset fails before any model is loaded
    if args.output and len(specs) * len(evaluators) > 1:
        raise ConfigError("--output names one result file; with several models or datasets use --output-dir")
    lengths = _seq_lens(args.seq_len)
    if args.command == "dense" and args.seq_len is not None:
        raise ConfigError("dense evaluates square grounding canvases at one grid (--image-size); --seq-len is for "
                          "zeroshot, retrieval and probe")
    if args.output and len(lengths) > 1:
        raise ConfigError("--output names one result file; with several --seq-len values use --output-dir")
    records = []
    for path, open_clip_name in specs:
        if args.command == "dense" and open_clip_name is None and (Path(path) / BUNDLE_FILE).is_file():
            records += _dense_on_bundle(args, path, evaluators, device)
            continue
        loaded = load_encoder(path, open_clip_name, device, args.weights if open_clip_name is None else "model")
        for seq_len in lengths:
            encoder = loaded if seq_len is None else at_seq_len(loaded, seq_len)
            for evaluator in evaluators:
                metrics = evaluator.run(encoder, device)
                # clip_benchmark's `model` / `pretrained` fields: the model's name and the weights it was read from.
                record = result_record(evaluator.name, encoder.name, metrics, encoder.source, task=TASKS[args.command])
                if seq_len is not None:
                    record["seq_len"] = seq_len
                records.append(record)
                at = "" if seq_len is None else f" at {seq_len} patches"
                print(f"{TASKS[args.command]}: {evaluator.name} ({args.split}), {encoder.name} {encoder.source}{at}")
                print("  " + "  ".join(f"{name}={value:.4f}" for name, value in metrics.items()))
        del loaded, encoder
    if args.output:
        write_result(args.output, records[0])
        print(f"written to {args.output}")
    if args.output_dir:
        out = Path(args.output_dir)
        for record in records:
            write_result(out / result_filename(record), record)
        write_summary(out / "summary.csv", records)
        print(f"{len(records)} result(s) and summary.csv written to {out}")
    return 0


def _dense_on_bundle(args: argparse.Namespace, path: str, evaluators: list, device: torch.device) -> list[dict]:
    """An exported encoder bundle (image tower only) through the dense evaluators, at --feature-layer."""
    vision = load_vision_encoder(path, args.feature_layer).to(device)
    records = []
    for evaluator in evaluators:
        metrics = evaluator.run_tokens(lambda images: vision(images).patch_tokens, vision.preprocess, device)
        records.append(result_record(evaluator.name, Path(path).name, metrics, str(path), task=TASKS["dense"]))
        print(f"{TASKS['dense']}: {evaluator.name} ({args.split}), bundle {path}")
        print("  " + "  ".join(f"{name}={value:.4f}" for name, value in metrics.items()))
    return records


def _seq_lens(text: str | None) -> list[int | None]:
    """--seq-len "64,144" -> [64, 144]; absent -> [None] (the model's fixed resolution)."""
    if text is None:
        return [None]
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdecimal() and int(part) > 0 for part in parts):
        raise ConfigError(f"--seq-len takes comma-separated positive patch counts such as 64,144,256,576, "
                          f"got {text!r}")
    return [int(part) for part in parts]


def _caption(args: argparse.Namespace) -> int:
    """Captions for the first --count images (CapPa or CoCa checkpoints); with labels, how many name their class."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = load_encoder(args.checkpoint, device=device, weights=args.weights)
    dataset = open_classification_dataset(args.dataset_root, args.split)
    loader = dataset.loader(encoder.preprocess, args.batch_size, args.workers)
    records = caption_dataset(encoder.model, encoder.tokenizer, loader, device, args.count,
                              args.max_length or encoder.model.context_length, args.beam_size)
    named = 0
    for record in records:
        record["named_class"] = named_class(record["caption"], dataset.classnames)
        named += record["named_class"] == record["label"]
        print(f"{record['key']}\t{dataset.classnames[record['label']]}\t{record['caption']}")
    print(f"captions naming the image's class: {named}/{len(records)} = {named / max(len(records), 1):.4f} "
          f"({'greedy' if args.beam_size == 1 else f'beam search, {args.beam_size} beams'}; {encoder.source})")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("".join(json.dumps(record) + "\n" for record in records))
        print(f"written to {args.output}")
    return 0


def _grounding(args: argparse.Namespace) -> int:
    """Box-regression probe on frozen patch tokens (and a LocCa decoder's own referring), at IoU >= 0.5."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = load_encoder(args.checkpoint, device=device, weights=args.weights)
    metrics = evaluate_grounding(encoder, args.dataset_root, device, ProbeSettings(steps=args.probe_steps,
                                                                                  seed=args.seed))
    print(f"grounding: {encoder.name} {encoder.source} on {args.dataset_root} (test canvases)")
    print("  " + "  ".join(f"{name}={value:.4f}" for name, value in metrics.items()))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"model": encoder.name, "source": encoder.source,
                                                 "dataset": str(args.dataset_root), "metrics": metrics}, indent=2))
        print(f"written to {args.output}")
    return 0


def _add_grounding_command(commands) -> None:
    parser = commands.add_parser("grounding", help="grounding accuracy at IoU>=0.5 with a frozen encoder "
                                 "(a box-regression probe; a LocCa decoder's referring too)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file, run directory, open_clip or "
                        "transformers directory")
    parser.add_argument("--dataset-root", required=True, help="a grounding set (contrastive-data demo --grounding)")
    parser.add_argument("--probe-steps", type=int, default=ProbeSettings.steps)
    parser.add_argument("--seed", type=int, default=0, help="the probe's initialisation and batch order")
    parser.add_argument("--output", default=None, help="JSON file of the metrics")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    _add_weights_argument(parser)
    parser.set_defaults(run=_grounding)


def _report(args: argparse.Namespace) -> int:
    """One self-contained HTML file: model facts, training curves, zero-shot, retrieval, captions (see eval/report)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = write_report(args.checkpoint, args.dataset_root, args.out, args.compare, args.split, device,
                       args.batch_size)
    print(f"report written to {out} ({out.stat().st_size / 1e3:.0f} kB)")
    return 0


def _add_report_command(commands) -> None:
    parser = commands.add_parser("report", help="a self-contained HTML report of a model (or two, side by side)")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file, run directory, open_clip or transformers directory")
    parser.add_argument("--compare", default=None, help="a second model, shown beside the first")
    parser.add_argument("--dataset-root", required=True,
                        help="labelled dataset directory; shards with captions also give retrieval")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="the HTML file to write")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.set_defaults(run=_report)


def _add_caption_command(commands) -> None:
    parser = commands.add_parser("caption", help="generate captions with a captioning checkpoint (CapPa, CoCa)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    parser.add_argument("--dataset-root", required=True, help="labelled dataset directory (shards or image folder)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=100, help="caption the first COUNT images")
    parser.add_argument("--beam-size", type=int, default=1, help="1 is greedy decoding")
    parser.add_argument("--max-length", type=int, default=None, help="tokens, start and end included "
                                                                     "(default: the model's context length)")
    parser.add_argument("--output", default=None, help="JSON-lines file of {key, label, caption, named_class}")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    _add_weights_argument(parser)
    parser.set_defaults(run=_caption)


def _add_weights_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default="model", choices=WEIGHTS,
                        help="of checkpoints of ours: the trained weights (model) or their moving average (ema)")


def _add_evaluation_command(commands, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text)
    parser.add_argument("--checkpoint", nargs="+", default=None,
                        help="checkpoint files, run directories, open_clip or transformers directories")
    parser.add_argument("--open-clip", nargs=2, action="append", metavar=("NAME", "WEIGHTS"),
                        help="an open_clip model config name and a local weights file (repeatable)")
    parser.add_argument("--dataset-root", nargs="+", required=True, help="dataset directories")
    parser.add_argument("--dataset-name", default=None, help="name in the result (default: the directory name)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output", default=None, help="result JSON path (one model and one dataset)")
    parser.add_argument("--output-dir", default=None, help="one result JSON per (model, dataset) and summary.csv")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--seq-len", default=None, metavar="L1,L2,...",
                        help="NaFlex checkpoints: evaluate at each of these patch counts per image, aspect kept")
    _add_weights_argument(parser)
    parser.set_defaults(run=_evaluate)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastive-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    zeroshot = _add_evaluation_command(commands, "zeroshot", "zero-shot classification on labelled images")
    zeroshot.add_argument("--classnames", default=None, help="file or built-in list (default: the dataset's)")
    zeroshot.add_argument("--templates", default=None, help="file or built-in list (default: the dataset's)")
    _add_evaluation_command(commands, "retrieval", "zero-shot image-text retrieval on paired shards")
    probe = _add_evaluation_command(commands, "probe", "linear probe fitted on --train-split, scored on --split")
    probe.add_argument("--train-split", default="train")
    dense = _add_evaluation_command(commands, "dense", "linear probe on frozen patch tokens: the class under each "
                                                       "patch of grounding canvases (accuracy, mIoU)")
    dense.add_argument("--train-split", default="train")
    dense.add_argument("--feature-layer", type=int, default=-1,
                       help="the block whose patch tokens are probed, counted from the last (-1)")
    dense.add_argument("--image-size", type=int, default=None,
                       help="feed the canvases at this size (default: the encoder's; towers that resample their "
                            "position embeddings give a finer patch grid)")
    _add_caption_command(commands)
    _add_report_command(commands)
    _add_grounding_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"contrastive-eval {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
