"""Linear probes on frozen image features: multinomial logistic regression fitted with L-BFGS (torch), the L2
strength chosen on a validation split, k-shot sampling over several seeds, and the text-embedding warm start.

Features are the model's L2-normalised image embeddings (`extract_features`), the space the zero-shot
classifier lives in, or any (N, D) tensor (e.g. per-block token means, with `standardize=True`).

The warm start: the problem is convex, so where L-BFGS starts does not change the optimum. What makes the
zero-shot classifier matter is the penalty: with `prior` set, the L2 term pulls the weights towards it,
lambda * ||W - prior||^2 (instead of towards zero), so a strong penalty gives back the zero-shot classifier and a
weak one the plain probe. Few-shot probes gain most from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from contrastive.encoders import LoadedEncoder
from contrastive.errors import ConfigError
from contrastive.eval.datasets import open_classification_dataset
from contrastive.eval.features import ImageFeatures, encode_images
from contrastive.eval.zeroshot import build_classifier, classification_metrics, require_tokenizer

WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class LinearProbe:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    weight_decay: float
    mean: torch.Tensor | None = None  # standardisation fitted on the training features
    std: torch.Tensor | None = None
    validation: dict[float, float] = field(default_factory=dict)  # weight decay -> validation acc1

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            features = (features - self.mean) / self.std
        return features @ self.weight.T + self.bias

    def evaluate(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return classification_metrics(self.logits(features), labels)


def extract_features(model: nn.Module, loader, device: torch.device, progress: bool = False) -> ImageFeatures:
    """Frozen, L2-normalised image embeddings of every sample the loader yields."""
    model.eval()
    return encode_images(model, loader, device, normalize=True, progress=progress, desc="probe features")


def zeroshot_prior(encoder: LoadedEncoder, classnames: list[str], templates: list[str],
                   device: torch.device) -> torch.Tensor:
    """(C, D): the zero-shot classifier scaled by the encoder's logit scale (CLIP's 100 where the format keeps
    none), i.e. zero-shot logits as a linear layer."""
    require_tokenizer(encoder, "a zero-shot prior")
    classifier = build_classifier(encoder.model, encoder.tokenizer, classnames, templates, device).float().cpu()
    return classifier * (encoder.logit_scale if encoder.logit_scale is not None else 100.0)


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                            prior: torch.Tensor | None = None,
                            max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,)) minimising mean cross-entropy + weight_decay * ||W - prior||^2 (bias unpenalised)."""
    anchor = prior if prior is not None else torch.zeros(num_classes, features.shape[1])
    weight = anchor.clone().requires_grad_(True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + weight_decay * (weight - anchor).pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              num_classes: int, weight_decays: Sequence[float] = WEIGHT_DECAYS, prior: torch.Tensor | None = None,
              standardize: bool = False, refit_on_validation: bool = False) -> LinearProbe:
    """Pick the weight decay with the best validation acc1 (the smaller one on ties), then refit with it
    (on train + validation when `refit_on_validation`)."""
    if prior is not None and standardize:
        raise ConfigError("a zero-shot prior lives in the embedding space; it cannot be combined with standardize")
    mean = std = None
    if standardize:
        mean, std = train_x.mean(dim=0), train_x.std(dim=0).clamp_min(1e-6)
        train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    scores = {}
    for decay in weight_decays:
        weight, bias = fit_logistic_regression(train_x, train_y, num_classes, decay, prior)
        scores[decay] = ((val_x @ weight.T + bias).argmax(dim=1) == val_y).float().mean().item()
    best = max(weight_decays, key=lambda decay: (scores[decay], -decay))
    if refit_on_validation:
        train_x, train_y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])
    weight, bias = fit_logistic_regression(train_x, train_y, num_classes, best, prior)
    return LinearProbe(weight, bias, best, mean, std, scores)


def sample_per_class(labels: torch.Tensor, k: int, seed: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of k samples of every class present, drawn without replacement (reproducible from `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.ones(len(labels), dtype=torch.bool)
    if exclude is not None:
        allowed[exclude] = False
    chosen = []
    for cls in labels.unique().tolist():
        pool = torch.nonzero((labels == cls) & allowed).flatten()
        if len(pool) < k:
            raise ConfigError(f"class {cls} has {len(pool)} samples available, fewer than the {k} asked for")
        chosen.append(pool[torch.randperm(len(pool), generator=generator)[:k]])
    return torch.cat(chosen)


def k_shot_probes(train: ImageFeatures, test: ImageFeatures, num_classes: int, k: int, seeds: Sequence[int],
                  prior: torch.Tensor | None = None, val_per_class: int | None = None,
                  weight_decays: Sequence[float] = WEIGHT_DECAYS) -> list[dict[str, float]]:
    """One probe per seed on k training samples per class; the weight decay is chosen on `val_per_class`
    (default k) other training samples per class, never on the test split."""
    results = []
    for seed in seeds:
        train_idx = sample_per_class(train.labels, k, seed)
        val_idx = sample_per_class(train.labels, val_per_class or k, seed + 1_000_003, exclude=train_idx)
        probe = fit_probe(train.features[train_idx], train.labels[train_idx], train.features[val_idx],
                          train.labels[val_idx], num_classes, weight_decays, prior)
        results.append({**probe.evaluate(test.features, test.labels), "weight_decay": probe.weight_decay,
                        "seed": seed, "shots": k})
    return results


def full_probe(train: ImageFeatures | tuple[torch.Tensor, torch.Tensor], test: ImageFeatures | tuple,
               num_classes: int, val_fraction: float = 0.1, seed: int = 0, prior: torch.Tensor | None = None,
               standardize: bool = False, weight_decays: Sequence[float] = WEIGHT_DECAYS) -> dict[str, float]:
    """A probe on the whole training split: the weight decay is chosen on a random `val_fraction` of it, then the
    probe is refitted on all of it and scored on the test split."""
    train_x, train_y = (train.features, train.labels) if isinstance(train, ImageFeatures) else train
    test_x, test_y = (test.features, test.labels) if isinstance(test, ImageFeatures) else test
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be within (0, 1), got {val_fraction}")
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(len(order) * val_fraction))
    val, fit = order[:cut], order[cut:]
    probe = fit_probe(train_x[fit], train_y[fit], train_x[val], train_y[val], num_classes, weight_decays, prior,
                      standardize, refit_on_validation=True)
    return {**probe.evaluate(test_x, test_y), "weight_decay": probe.weight_decay}


class LinearProbeEvaluation:
    """Evaluator: run(encoder, device) -> test metrics of a full-data probe fitted on `train_split` (image-only
    encoders too)."""

    def __init__(self, name: str | None, root: str | Path, split: str = "test", train_split: str = "train",
                 batch_size: int = 512, num_workers: int = 0, progress: bool = False) -> None:
        self.train_set = open_classification_dataset(root, train_split, name)
        self.test_set = open_classification_dataset(root, split, name)
        self.name = self.test_set.name
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress

    def run(self, encoder: LoadedEncoder, device: torch.device) -> dict[str, float]:
        train = extract_features(encoder.model, self.train_set.loader(encoder.preprocess, self.batch_size,
                                                                      self.num_workers), device, self.progress)
        test = extract_features(encoder.model, self.test_set.loader(encoder.preprocess, self.batch_size,
                                                                    self.num_workers), device, self.progress)
        return full_probe(train, test, len(self.test_set.classnames))
