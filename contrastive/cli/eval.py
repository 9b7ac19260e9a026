"""`contrastive-eval`: evaluate checkpoints of ours.

    contrastive-eval zeroshot --checkpoint runs/demo --dataset-root data/demo/fashion-mnist \\
        --output runs/demo/zeroshot.json

--checkpoint takes a checkpoint file or a run directory (its newest checkpoint); --dataset-root a dataset in
clip_benchmark's wds layout (ROOT/SPLIT/*.tar with .cls labels, classnames.txt,
zeroshot_classification_templates.txt). The result JSON has clip_benchmark's shape.
"""

from __future__ import annotations

import argparse
import sys

import torch

from contrastive.eval.loading import load_trained_model
from contrastive.eval.zeroshot import ZeroShotClassification, result_record, write_result


def _zeroshot(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer, run = load_trained_model(args.checkpoint)
    model.to(device)
    evaluator = ZeroShotClassification(args.dataset_name, args.dataset_root, args.split,
                                       batch_size=args.batch_size, num_workers=args.workers, progress=True)
    metrics = evaluator.run(model, tokenizer, device)
    record = result_record(evaluator.dataset.name, run.get("name", "model"), metrics, pretrained=run["checkpoint"])
    print(f"\nzero-shot classification: {evaluator.dataset.name} ({args.split}), {run['checkpoint']} (step {run['step']})")
    print(f"  {'acc1':>8} {'acc5':>8} {'mean_per_class_recall':>22}")
    print(f"  {metrics['acc1']:8.4f} {metrics['acc5']:8.4f} {metrics['mean_per_class_recall']:22.4f}")
    if args.output:
        write_result(args.output, record)
        print(f"  written to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastive-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    zeroshot = commands.add_parser("zeroshot", help="zero-shot classification on labelled shards")
    zeroshot.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    zeroshot.add_argument("--dataset-root", required=True, help="clip_benchmark wds layout directory")
    zeroshot.add_argument("--dataset-name", default=None, help="name in the result (default: the directory name)")
    zeroshot.add_argument("--split", default="test")
    zeroshot.add_argument("--output", default=None, help="result JSON path")
    zeroshot.add_argument("--batch-size", type=int, default=256)
    zeroshot.add_argument("--workers", type=int, default=2)
    zeroshot.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    zeroshot.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    zeroshot.set_defaults(run=_zeroshot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"contrastive-eval {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
