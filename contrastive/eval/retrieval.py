"""Zero-shot image-text retrieval on paired shards, with clip_benchmark's metric names and semantics.

Each sample's .txt may hold several captions, one per line (clip_benchmark's retrieval layout; a plain
img2dataset caption is one line). Every caption is a query of its own:
- image_retrieval_recall@k: the fraction of captions whose image is among the k images scored highest for it;
- text_retrieval_recall@k: the fraction of images with at least one of their captions among the k captions
  scored highest for the image.
k is capped at the number of candidates. Ties are broken by torch.topk, as in clip_benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from contrastive.encoders import LoadedEncoder
from contrastive.errors import InputError
from contrastive.eval.datasets import open_retrieval_dataset
from contrastive.eval.features import ImageFeatures, encode_images
from contrastive.eval.zeroshot import require_text_tower, require_tokenizer

RECALL_KS = (1, 5, 10)


def _hits_at_k(queries: torch.Tensor, candidates: torch.Tensor, is_match: Callable, k: int,
               chunk: int) -> torch.Tensor:
    """(Q,) bool: whether any of each query's k best-scored candidates matches it (scored in row chunks)."""
    hits = []
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ candidates.T  # (chunk, C)
        top = scores.topk(min(k, candidates.shape[0]), dim=1).indices  # (chunk, k)
        hits.append(is_match(torch.arange(start, start + len(top))[:, None], top).any(dim=1))
    return torch.cat(hits)


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: tuple[int, ...] = RECALL_KS, chunk: int = 1024) -> dict[str, float]:
    """image_features (I, D), text_features (T, D), text_to_image (T,): the image each caption belongs to."""
    metrics = {}
    for k in ks:
        image_hits = _hits_at_k(text_features, image_features, lambda t, top: top == text_to_image[t], k, chunk)
        text_hits = _hits_at_k(image_features, text_features, lambda i, top: text_to_image[top] == i, k, chunk)
        metrics[f"image_retrieval_recall@{k}"] = image_hits.float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = text_hits.float().mean().item()
    return metrics


def split_captions(captions: list[str], keys: list[str]) -> tuple[list[str], torch.Tensor]:
    """(all captions, the image index of each) from one newline-separated caption string per image."""
    texts, owners = [], []
    for index, (caption, key) in enumerate(zip(captions, keys)):
        lines = [line.strip() for line in caption.splitlines() if line.strip()]
        if not lines:
            raise InputError(f"retrieval sample {key} has no caption (.txt)")
        texts.extend(lines)
        owners.extend([index] * len(lines))
    return texts, torch.tensor(owners)


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Callable, texts: list[str], device: torch.device, batch_size: int,
                 progress: bool = False) -> torch.Tensor:
    """(T, D) normalised text embeddings on CPU."""
    require_text_tower(model, "retrieval")
    batches = range(0, len(texts), batch_size)
    return torch.cat([
        model.encode_text(tokenizer(texts[start:start + batch_size]).to(device), normalize=True).float().cpu()
        for start in tqdm(batches, desc="captions", disable=not progress)
    ])


class ZeroShotRetrieval:
    """Evaluator: run(encoder, device) -> {image,text}_retrieval_recall@{1,5,10}."""

    def __init__(self, name: str | None, root: str | Path, split: str = "test", batch_size: int = 512,
                 num_workers: int = 0, progress: bool = False) -> None:
        self.dataset = open_retrieval_dataset(root, split, name)
        self.name = self.dataset.name
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress

    def run(self, encoder: LoadedEncoder, device: torch.device) -> dict[str, float]:
        images, text_features, _, text_to_image = self.features(encoder, device)
        return retrieval_metrics(images.features, text_features, text_to_image)

    @torch.no_grad()
    def features(self, encoder: LoadedEncoder, device: torch.device, images: ImageFeatures | None = None
                 ) -> tuple[ImageFeatures, torch.Tensor, list[str], torch.Tensor]:
        """(image features, text features (T, D), the captions, text_to_image (T,)): what the metrics (and reports)
        are computed from. `images`: this dataset's features, already encoded (a report shares one pass)."""
        require_tokenizer(encoder, "retrieval")
        require_text_tower(encoder.model, "retrieval")
        if images is None:
            loader = self.dataset.loader(encoder.preprocess, self.batch_size, self.num_workers)
            images = encode_images(encoder.model, loader, device, progress=self.progress,
                                   desc=f"retrieval {self.name}")
        texts, text_to_image = split_captions(images.captions, images.keys)
        text_features = encode_texts(encoder.model, encoder.tokenizer, texts, device, self.batch_size, self.progress)
        return images, text_features, texts, text_to_image
