"""The evaluators of a training run, from its `eval` config (contrastive-train builds them and hands them to the
trainer); each has `.name` and `run(encoder, device)`."""

from __future__ import annotations

from contrastive.config import EvalConfig
from contrastive.eval.retrieval import ZeroShotRetrieval
from contrastive.eval.zeroshot import ZeroShotClassification
from contrastive.types import Evaluator


def build_evaluators(cfg: EvalConfig) -> list[Evaluator]:
    """Zero-shot classification for each `eval.zeroshot` entry, then retrieval for each `eval.retrieval` entry."""
    return [
        *(ZeroShotClassification(d.name, d.root, d.split, batch_size=cfg.batch_size) for d in cfg.zeroshot),
        *(ZeroShotRetrieval(d.name, d.root, d.split, batch_size=cfg.batch_size) for d in cfg.retrieval),
    ]
