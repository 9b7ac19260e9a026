"""Zero-shot classification: a prompt-ensemble classifier from the text tower, scored on labelled images.

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

from contrastive.encoders import LoadedEncoder
from contrastive.errors import ConfigError, InputError
from contrastive.eval.captioning import caption_classification_scores
from contrastive.eval.datasets import open_classification_dataset
from contrastive.eval.features import ImageFeatures, encode_images
from contrastive.eval.prompts import fill_template


def require_text_tower(model: nn.Module, task: str) -> None:
    if not hasattr(model, "encode_text"):
        raise ConfigError(f"{task} needs a text encoder; a {type(model).__name__} model has none")


def require_tokenizer(encoder: LoadedEncoder, task: str) -> None:
    if encoder.tokenizer is None:
        raise ConfigError(f"{task} needs a text tower and its tokenizer; {encoder.name} ({encoder.kind}, "
                         f"{encoder.source}) is image-only")


@torch.no_grad()
def build_classifier(model: nn.Module, tokenizer: Callable, classnames: list[str], templates: list[str],
                     device: torch.device, progress: bool = False) -> torch.Tensor:
    """(C, D): per class, the renormalised mean of the normalised text embeddings of all its prompts."""
    require_text_tower(model, "a zero-shot classifier")
    weights = []
    for classname in tqdm(classnames, desc="classifier", disable=not progress):
        tokens = tokenizer([fill_template(template, classname) for template in templates]).to(device)
        embeddings = model.encode_text(tokens, normalize=True)  # (T, D)
        weights.append(F.normalize(embeddings.float().mean(dim=0), dim=-1))
    return torch.stack(weights)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 and mean per-class recall (balanced accuracy over the classes present), as clip_benchmark reports."""
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
    """Evaluator: run(encoder, device) -> {"acc1", "acc5", "mean_per_class_recall"}.

    Two-tower encoders score images against prompt-ensemble text embeddings; captioners (no encode_text) rank the
    classes by caption log-likelihood. `classnames` / `templates` (a file or a built-in name) replace the dataset's
    own files.
    """

    def __init__(self, name: str | None, root: str | Path, split: str = "test", batch_size: int = 512,
                 num_workers: int = 0, progress: bool = False, classnames: str | None = None,
                 templates: str | None = None) -> None:
        self.dataset = open_classification_dataset(root, split, name, classnames, templates)
        self.name = self.dataset.name
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress

    def run(self, encoder: LoadedEncoder, device: torch.device) -> dict[str, float]:
        return classification_metrics(*self.scores(encoder, device))

    @torch.no_grad()
    def scores(self, encoder: LoadedEncoder, device: torch.device,
               images: ImageFeatures | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(class scores (N, C), labels (N,)) in dataset order: what the metrics (and reports) are computed from.
        `images`: this dataset's features, already encoded (a report encodes once for zero-shot and retrieval)."""
        require_tokenizer(encoder, "zero-shot classification")
        model, tokenizer = encoder.model, encoder.tokenizer
        loader = self.dataset.loader(encoder.preprocess, self.batch_size, self.num_workers)
        if not hasattr(model, "encode_text"):  # a captioner (CapPa): classes ranked by caption log-likelihood
            return caption_classification_scores(model, tokenizer, self.dataset.classnames, self.dataset.templates,
                                                 loader, device, self.progress)
        classifier = build_classifier(model, tokenizer, self.dataset.classnames, self.dataset.templates, device,
                                      self.progress)
        if images is None:
            images = encode_images(model, loader, device, progress=self.progress, desc=f"zero-shot {self.name}")
        labels = images.labels
        if (labels < 0).any() or (labels >= len(self.dataset.classnames)).any():
            raise InputError(f"{self.name}: labels outside 0..{len(self.dataset.classnames) - 1}; "
                             f"do the class names and the shards' .cls files match?")
        return images.features @ classifier.float().cpu().T, labels


def result_record(dataset: str, model: str, metrics: dict[str, float], pretrained: str | None = None,
                  task: str = "zeroshot_classification") -> dict:
    """clip_benchmark's result shape."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
            "language": "en"}


def write_result(path: str | Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
