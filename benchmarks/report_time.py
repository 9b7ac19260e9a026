"""How long `contrastive-eval report` takes beyond the evaluations it needs, on one model and dataset.

    python benchmarks/report_time.py --checkpoint runs/demo --dataset-root data/demo/fashion-mnist \\
        --json runs/demo/report_time.json

Measured in one process, in this order: `contrastive-eval zeroshot` and `contrastive-eval retrieval` (the
evaluations the report runs), then `contrastive-eval report`. Prints the report's time, the evaluations' time, the
difference and their ratio. The difference is the report's own cost (figures, example images read back, captions,
patch maps) less what it saves by encoding the images once for both tasks, so it can be below zero.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from contrastive.cli.eval import main as eval_main


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    if eval_main(argv) != 0:
        raise SystemExit(f"contrastive-eval {argv[0]} failed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset-root", required=True)
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--out", default=None, help="keep the report here (default: a scratch directory)")
    args = parser.parse_args()
    common = ["--checkpoint", args.checkpoint, "--dataset-root", args.dataset_root]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        quiet = ["--workers", "0", "--no-progress"]
        zeroshot = timed(["zeroshot", *common, "--output", str(scratch / "zs.json"), *quiet])
        retrieval = timed(["retrieval", *common, "--output", str(scratch / "rt.json"), *quiet])
        html = Path(args.out) if args.out else scratch / "report.html"
        report = timed(["report", *common, "--out", str(html)])
        size = html.stat().st_size
    evaluations = zeroshot + retrieval
    result = {
        "report_s": report, "evaluations_s": evaluations, "zeroshot_s": zeroshot, "retrieval_s": retrieval,
        "report_beyond_evaluations_s": report - evaluations, "report_over_evaluations": report / evaluations,
        "report_bytes": size, "threads": torch.get_num_threads(),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "command": " ".join([sys.executable, *sys.argv]),
    }
    print(f"evaluations {evaluations:.1f} s (zero-shot {zeroshot:.1f}, retrieval {retrieval:.1f}); report "
          f"{report:.1f} s: {report - evaluations:+.1f} s beyond them, ratio {report / evaluations:.2f}; "
          f"{size / 1e3:.0f} kB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
