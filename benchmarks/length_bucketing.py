"""Caption-length bucketing (data.length_bucketing): padding fraction and text-tower time per step, with and without.

    python benchmarks/length_bucketing.py --json benchmarks/results/length_bucketing.json
    python benchmarks/length_bucketing.py --smoke --json /tmp/bucketing_smoke.json   # what CI runs

The demo's captions are read by the training stream (batches of --batch-size, tokenized to --context-length, 77
as in CLIP's text towers) in three ways: every caption padded to the context length (the reference: bucketing
off), each batch padded to its own longest caption (`data.bucket_batches=1`), and bucketing over windows of
--bucket-batches batches. The padding fraction is the share of padding tokens in the batches. The text-tower time
is one forward and backward of the --model text tower on a step's tokens, timed for the three ways in turn on the
same step (so machine noise hits them alike); figures are medians over --steps steps, with ratios to the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.provenance import git_commit  # noqa: E402
from contrastive.config import register_configs  # noqa: E402
from contrastive.data.demo import build_demo_dataset  # noqa: E402
from contrastive.data.loader import build_train_loader  # noqa: E402
from contrastive.encoders import preprocess_from_config  # noqa: E402
from contrastive.models import build_model, build_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "length_bucketing")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--bucket-batches", type=int, default=8)
    parser.add_argument("--model", default="tiny_clip", help="a conf/model/ file; its text tower is timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI): 2 steps of 32, the test model")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.bucket_batches, args.model = 2, 32, 2, "test_tiny"
    return args


def stream_tokens(args: argparse.Namespace, shards: Path, bucket_batches: int | None, steps: int) -> list:
    overrides = [f"model={args.model}", f"model.text.context_length={args.context_length}",
                 f"data.sources.0.shards={shards}", f"data.batch_size={args.batch_size}", "data.num_workers=0",
                 "data.shuffle_buffer=1000"]
    if bucket_batches is not None:
        overrides += ["data.length_bucketing=true", f"data.bucket_batches={bucket_batches}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    loader = build_train_loader(cfg.data, preprocess_from_config(cfg.model), build_tokenizer(cfg.model), rank=0,
                                world_size=1, seed=0)
    batches = iter(loader)
    return [next(batches).tokens for _ in range(steps)], cfg


def text_tower_seconds(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    model.encode_text(tokens).sum().backward()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    register_configs()
    samples = max(512, args.steps * args.batch_size)
    data = build_demo_dataset(args.work_dir / f"fashion-mnist-{samples}", samples_per_shard=max(2, samples // 4),
                              limit=samples)
    modes = {"full_padding": None, "own_longest": 1, "bucketed": args.bucket_batches}
    tokens, cfg = {}, None
    for name, bucket_batches in modes.items():
        tokens[name], cfg = stream_tokens(args, data.root / "train", bucket_batches, args.steps)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    text_tower_seconds(model, tokens["full_padding"][0])  # warm-up
    seconds = {name: [] for name in modes}
    for step in range(args.steps):
        for name in modes:
            seconds[name].append(text_tower_seconds(model, tokens[name][step]))
    results = {}
    for name in modes:
        padded = sum(int((t == 0).sum()) for t in tokens[name])
        total = sum(t.numel() for t in tokens[name])
        results[name] = {
            "padding_fraction": padded / total,
            "mean_width": statistics.mean(t.shape[1] for t in tokens[name]),
            "text_tower_seconds_median": statistics.median(seconds[name]),
        }
    reference = results["full_padding"]["text_tower_seconds_median"]
    for name, result in results.items():
        result["text_tower_speedup"] = reference / result["text_tower_seconds_median"]
        print(f"{name:13s}: padding {result['padding_fraction']:.3f}, mean width {result['mean_width']:.1f} tokens, "
              f"text tower {1e3 * result['text_tower_seconds_median']:.1f} ms/step "
              f"({result['text_tower_speedup']:.2f}x full padding)")
    report = {
        "benchmark": "length_bucketing", "commit": git_commit(),
        "command": " ".join(["python", f"benchmarks/{Path(__file__).name}",
                             *(sys.argv[1:] if argv is None else argv)]),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "results": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
