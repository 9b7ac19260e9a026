"""Captioning models at evaluation time: caption generation (greedy, beam search) and caption-likelihood scoring.

Works with any model that has `encode_image_tokens(images) -> (B, N, D)` and
`decode(image_tokens, inputs, parallel=False) -> (B, T, V)` next-token logits (CapPa, CoCa).

Zero-shot classification the CapPa way scores every class prompt by its log-likelihood as a caption of the image
(summed over its tokens, averaged over the prompt templates) and picks the best class. `mode="parallel"` scores
all prompts from one parallel-prediction decoder pass per image (its inputs are mask tokens, so the per-position
distributions do not depend on the prompt); `mode="autoregressive"` runs teacher forcing on every prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from contrastive.errors import ConfigError, InputError
from contrastive.eval.prompts import PLACEHOLDER

PAD_ID = 0
SCORING_MODES = ("parallel", "autoregressive")


def special_tokens(tokenizer) -> tuple[int, int]:
    """(start-of-text id, end-of-text id) of an open_clip tokenizer."""
    sot, eot = getattr(tokenizer, "sot_token_id", None), getattr(tokenizer, "eot_token_id", None)
    if sot is None or eot is None:
        raise ConfigError(f"{type(tokenizer).__name__} exposes no sot_token_id / eot_token_id for caption generation")
    return sot, eot


def caption_texts(tokenizer, sequences: torch.Tensor) -> list[str]:
    """Text of generated sequences (N, T): the tokens after start-of-text, up to end-of-text."""
    sot, eot = special_tokens(tokenizer)
    texts = []
    for sequence in sequences.tolist():
        words = [t for t in sequence[1:] if t not in (PAD_ID, sot)]
        words = words[: words.index(eot)] if eot in words else words
        texts.append(tokenizer.decode(words).strip())
    return texts


@torch.no_grad()
def greedy_captions(model: nn.Module, images: torch.Tensor, sot: int, eot: int, max_length: int) -> torch.Tensor:
    """(B, <= max_length) token ids: start-of-text, then the most likely token each step; padded after end-of-text."""
    return beam_search_captions(model, images, sot, eot, max_length, beam_size=1)


@torch.no_grad()
def beam_search_captions(model: nn.Module, images: torch.Tensor, sot: int, eot: int, max_length: int,
                         beam_size: int = 4) -> torch.Tensor:
    """(B, <= max_length) token ids of the highest-log-likelihood caption found with `beam_size` beams.

    A beam that emits end-of-text is finished: it keeps its score and continues only with padding at no cost,
    competing with the live beams. Search stops when every beam is finished or max_length tokens are reached.
    """
    if beam_size < 1 or max_length < 2:
        raise ConfigError(f"need beam_size >= 1 and max_length >= 2, got {beam_size} and {max_length}")
    batch = images.shape[0]
    memory = model.encode_image_tokens(images).repeat_interleave(beam_size, dim=0)  # (B*K, N, D)
    sequences = torch.full((batch * beam_size, 1), sot, dtype=torch.long, device=images.device)
    scores = torch.full((batch, beam_size), float("-inf"), device=images.device)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step does not pick duplicates
    finished = torch.zeros(batch * beam_size, dtype=torch.bool, device=images.device)
    for _ in range(max_length - 1):
        log_probs = model.decode(memory, sequences)[:, -1].float().log_softmax(dim=-1)  # (B*K, V)
        log_probs[:, [PAD_ID, sot]] = float("-inf")  # a live caption continues with a word or ends
        vocab = log_probs.shape[-1]
        pad_only = torch.full_like(log_probs, float("-inf"))
        pad_only[:, PAD_ID] = 0.0
        log_probs = torch.where(finished[:, None], pad_only, log_probs)
        candidates = (scores.view(-1, 1) + log_probs).view(batch, beam_size * vocab)
        scores, chosen = candidates.topk(beam_size, dim=1)  # (B, K)
        parents = (chosen // vocab + torch.arange(batch, device=images.device)[:, None] * beam_size).view(-1)
        tokens = (chosen % vocab).view(-1, 1)
        sequences = torch.cat([sequences[parents], tokens], dim=1)
        finished = finished[parents] | (tokens[:, 0] == eot)
        if finished.all():
            break
    best = scores.argmax(dim=1) + torch.arange(batch, device=images.device) * beam_size
    return sequences[best]


def sequence_log_likelihoods(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over positions of log p(target); logits (..., T, V), targets (..., T) with PAD_ID not scored."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
    return (picked * (targets != PAD_ID)).sum(dim=-1)


@torch.no_grad()
def caption_log_likelihoods(model: nn.Module, images: torch.Tensor, prompts: torch.Tensor,
                            mode: str = "parallel", chunk: int = 64) -> torch.Tensor:
    """(B, P): log p(prompt | image) for every image and every tokenized prompt (P, L).

    `chunk` bounds how many decoder sequences are scored at once (each holds a (T, vocab) logit table).
    """
    if mode not in SCORING_MODES:
        raise ConfigError(f"caption scoring mode {mode!r} is not one of {', '.join(SCORING_MODES)}")
    length = int((prompts != PAD_ID).sum(dim=1).max())  # drop the all-padding tail
    inputs, targets = prompts[:, : length - 1], prompts[:, 1:length]  # (P, T)
    memory = model.encode_image_tokens(images)  # (B, N, D)
    batch, count = len(images), len(prompts)
    if mode == "parallel":
        scores = []
        for start in range(0, batch, chunk):
            part = memory[start : start + chunk]
            # Parallel mode attends over every position, so decode at the training length and then trim.
            full_inputs = prompts[:1, :-1].expand(len(part), -1)
            logits = model.decode(part, full_inputs, parallel=True)[:, : length - 1].float()  # (b, T, V)
            positions = torch.arange(targets.shape[1], device=logits.device)
            picked = logits[:, positions, targets] - logits.logsumexp(dim=-1)[:, None]  # (b, P, T)
            scores.append((picked * (targets != PAD_ID)).sum(dim=-1))  # (b, P)
        return torch.cat(scores)
    pairs = torch.cartesian_prod(torch.arange(batch), torch.arange(count)).to(images.device)  # (B*P, 2)
    scores = []
    for start in range(0, len(pairs), chunk):
        image_index, prompt_index = pairs[start : start + chunk].unbind(dim=1)
        logits = model.decode(memory[image_index], inputs[prompt_index])  # (c, T, V)
        scores.append(sequence_log_likelihoods(logits, targets[prompt_index]))
    return torch.cat(scores).view(batch, count)


class CaptionScoringClassifier:
    """Zero-shot classifier for captioning models: images (B, 3, H, W) -> class scores (B, C).

    A class's score is the mean over templates of its prompt's caption log-likelihood.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, classnames: list[str], templates: list[str],
                 device: torch.device, mode: str = "parallel") -> None:
        texts = [template.replace(PLACEHOLDER, name) for name in classnames for template in templates]
        self.prompts = tokenizer(texts).to(device)  # (C*T, L), class-major
        self.num_classes = len(classnames)
        self.model = model
        self.mode = mode

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        scores = caption_log_likelihoods(self.model, images, self.prompts, self.mode)  # (B, C*T)
        return scores.view(len(images), self.num_classes, -1).mean(dim=-1)


@torch.no_grad()
def caption_classification_scores(model: nn.Module, tokenizer: Callable, classnames: list[str],
                                  templates: list[str], loader: Iterable, device: torch.device,
                                  progress: bool = False, mode: str = "parallel") -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (N, C), labels (N,)) over a loader of (images, captions, labels, keys) batches."""
    classifier = CaptionScoringClassifier(model, tokenizer, classnames, templates, device, mode)
    scores, labels = [], []
    for images, _, batch_labels, _ in tqdm(loader, desc="caption scoring", disable=not progress):
        scores.append(classifier(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(batch_labels))
    if not scores:
        raise InputError("caption scoring: the dataset yielded no samples")
    labels = torch.cat(labels)
    if (labels < 0).any() or (labels >= len(classnames)).any():
        raise InputError(f"labels outside 0..{len(classnames) - 1}; do the class names and the labels match?")
    return torch.cat(scores), labels


def named_class(caption: str, classnames: list[str]) -> int | None:
    """The class a caption names: the longest class name it contains, ignoring case, spaces and punctuation
    (so "t - shirt / top" names "T-shirt/top", not "shirt")."""
    def squash(text: str) -> str:
        return "".join(ch for ch in text.lower() if ch.isalnum())

    caption = squash(caption)
    found = [(len(squash(name)), index) for index, name in enumerate(classnames) if squash(name) in caption]
    return max(found)[1] if found else None


@torch.no_grad()
def caption_dataset(model: nn.Module, tokenizer, loader: Iterable, device: torch.device, count: int,
                    max_length: int, beam_size: int = 1) -> list[dict]:
    """Generate captions for the first `count` images of a loader: [{"key", "label", "caption"}]."""
    if not hasattr(model, "decode"):
        raise ConfigError(f"a {type(model).__name__} model has no caption decoder; CapPa and CoCa models caption")
    sot, eot = special_tokens(tokenizer)
    records: list[dict] = []
    for images, _, labels, keys in loader:
        images = images[: count - len(records)].to(device)
        sequences = beam_search_captions(model, images, sot, eot, max_length, beam_size)
        for key, label, text in zip(keys, torch.as_tensor(labels).tolist(), caption_texts(tokenizer, sequences)):
            records.append({"key": key, "label": label, "caption": text})
        if len(records) >= count:
            break
    return records
