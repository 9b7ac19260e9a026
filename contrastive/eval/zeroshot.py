"""Zero-shot classification: a prompt-ensemble classifier from the text tower, scored on labelled shards.

Metric names and the result JSON follow clip_benchmark, so numbers are comparable with published tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from contrastive.data.loader import build_eval_loader
from contrastive.eval.datasets import PLACEHOLDER, load_classification_dataset


@torch.no_grad()
def build_classifier(model: nn.Module, tokenizer: Callable, classnames: list[str], templates: list[str],
                     device: torch.device) -> torch.Tensor:
    """(C, D): per class, the renormalised mean of the normalised text embeddings of all its prompts."""
    weights = []
    for classname in classnames:
        tokens = tokenizer([template.replace(PLACEHOLDER, classname) for template in templates]).to(device)
        embeddings = model.encode_text(tokens, normalize=True)  # (T, D)
        weights.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(weights)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 and mean per-class recall (balanced accuracy), as clip_benchmark reports them."""
    num_classes = logits.shape[1]
    top = logits.topk(min(5, num_classes), dim=1).indices  # (N, k)
    correct = top == labels[:, None]
    predictions = top[:, 0]
    recalls = [(predictions[labels == c] == c).float().mean() for c in range(num_classes) if (labels == c).any()]
    return {
        "acc1": correct[:, :1].any(dim=1).float().mean().item(),
        "acc5": correct.any(dim=1).float().mean().item(),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


class ZeroShotClassification:
    """Evaluator: run(model, tokenizer, device) -> {"acc1", "acc5", "mean_per_class_recall"}.

    `model` is one of ours (its `cfg` gives the preprocessing) with encode_image / encode_text.
    """

    def __init__(self, name: str | None, root: str | Path, split: str = "test", batch_size: int = 512,
                 num_workers: int = 0, progress: bool = False) -> None:
        self.dataset = load_classification_dataset(root, split, name)
        self.name = self.dataset.name
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress

    @torch.no_grad()
    def run(self, model: nn.Module, tokenizer: Callable, device: torch.device) -> dict[str, float]:
        classifier = build_classifier(model, tokenizer, self.dataset.classnames, self.dataset.templates, device)
        loader = build_eval_loader(self.dataset.urls, model.cfg, self.batch_size, self.num_workers)
        all_logits, all_labels = [], []
        for images, _, labels, _ in tqdm(loader, desc=f"zero-shot {self.name}", disable=not self.progress):
            features = model.encode_image(images.to(device), normalize=True)
            all_logits.append((features @ classifier.T).float().cpu())
            all_labels.append(labels)
        labels = torch.cat(all_labels)
        if (labels < 0).any() or (labels >= len(self.dataset.classnames)).any():
            raise ValueError(f"{self.name}: labels outside 0..{len(self.dataset.classnames) - 1}; "
                             f"do classnames.txt and the shards' .cls files match?")
        return classification_metrics(torch.cat(all_logits), labels)


def result_record(dataset: str, model: str, metrics: dict[str, float], pretrained: str | None = None) -> dict:
    """clip_benchmark's result shape."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": "zeroshot_classification",
            "metrics": metrics, "language": "en"}


def write_result(path: str | Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
