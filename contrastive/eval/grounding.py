"""Grounding with a frozen encoder: a small box-regression probe on patch tokens, scored at IoU >= 0.5 on held-out
grounding canvases (contrastive.data.grounding); for LocCa models also the decoder's own referring accuracy.

The probe sees only the frozen image tower's patch tokens; its phrase side is its own learned embedding of each
class phrase, so every model is compared on its image tokens alone, whether or not it has a text tower or a
decoder. The probe (BoxProbe) is trained with L1 + generalised IoU loss (DETR's pair) on every (train canvas,
phrase) for a fixed number of steps from a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss

from contrastive.data.boxes import REFERRING, TASK_PROMPTS, parse_box_text
from contrastive.data.grounding import GroundingSplit, load_grounding_split
from contrastive.errors import ConfigError

IOU_THRESHOLD = 0.5
TOKEN_CHANNELS = 8  # per patch token, into the probe
MATCH_MAPS = 4  # per phrase


@dataclass(frozen=True)
class ProbeSettings:
    steps: int = 600
    batch_size: int = 256
    lr: float = 2e-3
    width: int = 128
    seed: int = 0


@torch.no_grad()
def patch_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, N, D) the frozen image tower's patch tokens: the decoder's memory where the model has one
    (`encode_image_tokens`), a timm trunk's final-norm tokens, or an open_clip ViT's token output."""
    if hasattr(model, "encode_image_tokens"):
        return model.encode_image_tokens(images)
    visual = getattr(model, "visual", None)
    if hasattr(visual, "trunk") and hasattr(visual.trunk, "forward_features"):
        tokens = visual.trunk.forward_features(images)
        return tokens[:, getattr(visual.trunk, "num_prefix_tokens", 0):]
    if hasattr(visual, "output_tokens"):
        visual.output_tokens = True
        try:
            return visual(images)[1]
        finally:
            visual.output_tokens = False
    raise ConfigError(f"grounding: no patch tokens from the image tower {type(visual).__name__}")


def _pairs(split: GroundingSplit, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (canvas, box) pair: canvas indices (P,), labels (P,), boxes (P, 4) in [0, 1]."""
    canvases = torch.cat([torch.full((len(boxes),), index) for index, boxes in enumerate(split.boxes)])
    labels = torch.cat([torch.as_tensor(labels) for labels in split.labels])
    boxes = torch.cat([torch.as_tensor(boxes, dtype=torch.float32) for boxes in split.boxes]) / size
    return canvases, labels, boxes


class BoxProbe(nn.Module):
    """On standardised patch tokens: each phrase's MATCH_MAPS learned queries score every token (maps of where the
    phrase matches), each token is also squeezed to TOKEN_CHANNELS; both flattened in grid order (so where a token
    sits stays known), with the phrase's embedding, go through an MLP to the box's centre and size in [0, 1]."""

    def __init__(self, token_width: int, tokens: int, classes: int, width: int) -> None:
        super().__init__()
        self.squeeze = nn.Linear(token_width, TOKEN_CHANNELS)
        self.queries = nn.Embedding(classes, MATCH_MAPS * token_width)
        self.phrase = nn.Embedding(classes, width)
        self.head = nn.Sequential(nn.Linear(tokens * (TOKEN_CHANNELS + MATCH_MAPS) + width, 2 * width), nn.GELU(),
                                  nn.Linear(2 * width, 2 * width), nn.GELU(), nn.Linear(2 * width, 4))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens (P, N, D), labels (P,) -> boxes (P, 4) [x0, y0, x1, y1] in [0, 1]."""
        queries = self.queries(labels).view(len(labels), MATCH_MAPS, -1)  # (P, M, D)
        maps = torch.einsum("pnd,pmd->pnm", tokens, queries) / tokens.shape[-1] ** 0.5
        flat = torch.cat([self.squeeze(tokens), maps], dim=-1).flatten(1)  # (P, N * (C + M))
        centre_size = torch.sigmoid(self.head(torch.cat([flat, self.phrase(labels)], dim=-1)))
        centre, half = centre_size[:, :2], centre_size[:, 2:] / 2
        return torch.cat([(centre - half).clamp(0, 1), (centre + half).clamp(0, 1)], dim=-1)


def _canvas_batch(images: np.ndarray, transform) -> torch.Tensor:
    return torch.stack([transform(Image.fromarray(image).convert("RGB")) for image in images])


def encode_canvases(encoder, images: np.ndarray, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    transform = encoder.preprocess.transform()
    chunks = [patch_tokens(encoder.model, _canvas_batch(images[start:start + batch_size], transform).to(device))
              .float().cpu() for start in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def probe_accuracy(train_tokens: torch.Tensor, train: GroundingSplit, test_tokens: torch.Tensor,
                   test: GroundingSplit, settings: ProbeSettings) -> dict[str, float]:
    size = train.images.shape[1]
    canvases, labels, boxes = _pairs(train, size)
    mean, std = train_tokens.mean(dim=(0, 1)), train_tokens.std(dim=(0, 1)).clamp(min=1e-6)
    train_tokens, test_tokens = (train_tokens - mean) / std, (test_tokens - mean) / std
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    probe = BoxProbe(train_tokens.shape[-1], train_tokens.shape[1], len(train.class_names), settings.width)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=settings.lr, weight_decay=1e-4)
    for _ in range(settings.steps):
        chosen = torch.randint(len(labels), (settings.batch_size,), generator=generator)
        predicted = probe(train_tokens[canvases[chosen]], labels[chosen])
        loss = F.l1_loss(predicted, boxes[chosen]) + generalized_box_iou_loss(predicted, boxes[chosen],
                                                                              reduction="mean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    test_canvases, test_labels, test_boxes = _pairs(test, test.images.shape[1])
    with torch.no_grad():
        predicted = probe(test_tokens[test_canvases], test_labels)
    ious = box_iou(predicted, test_boxes).diagonal()
    return {"probe_acc_iou50": float((ious >= IOU_THRESHOLD).float().mean()), "probe_mean_iou": float(ious.mean())}


@torch.no_grad()
def decoder_referring_accuracy(encoder, test: GroundingSplit, device: torch.device, bins: int,
                               batch_size: int = 256) -> float:
    """Greedy decoding of "locate PHRASE"; a parse failure counts as a miss."""
    model, tokenizer = encoder.model, encoder.tokenizer
    image_size, canvas_size = encoder.preprocess.image_size, test.images.shape[1]
    transform = encoder.preprocess.transform()
    digits = 4 * len(str(bins - 1))
    hits = total = 0
    for start in range(0, len(test.images), batch_size):
        stop = min(start + batch_size, len(test.images))
        image_tokens = model.encode_image_tokens(_canvas_batch(test.images[start:stop], transform).to(device))
        pairs = [(index, phrase, box) for index in range(start, stop)
                 for phrase, box in zip(test.phrases[index], test.boxes[index])]
        prompts = tokenizer([f"{TASK_PROMPTS[REFERRING]} {phrase}" for _, phrase, _ in pairs])
        lengths = (prompts != 0).sum(dim=1) - 1  # without the end token
        for length in lengths.unique().tolist():  # one batch per prompt length: no padding inside the prompts
            rows = (lengths == length).nonzero().flatten()
            sequence = prompts[rows, :length].to(device)
            memory = image_tokens[torch.tensor([pairs[row][0] - start for row in rows.tolist()], device=device)]
            for _ in range(min(digits + 1, model.context_length - length)):
                next_token = model.decode(memory, sequence)[:, -1].argmax(dim=-1)
                sequence = torch.cat([sequence, next_token[:, None]], dim=1)
            for row, generated in zip(rows.tolist(), sequence[:, length:].cpu()):
                box = parse_box_text(tokenizer.decode(generated.tolist()), image_size, bins)
                truth = torch.as_tensor(pairs[row][2], dtype=torch.float32) * (image_size / canvas_size)
                hits += box is not None and float(box_iou(box[None], truth[None])[0, 0]) >= IOU_THRESHOLD
                total += 1
    return hits / max(total, 1)


def evaluate_grounding(encoder, root, device: torch.device, settings: ProbeSettings = ProbeSettings()
                       ) -> dict[str, float]:
    """The probe's accuracy at IoU >= 0.5 on the test canvases, and for LocCa models the decoder's."""
    train, test = load_grounding_split(root, "train"), load_grounding_split(root, "test")
    train_tokens = encode_canvases(encoder, train.images, device)
    test_tokens = encode_canvases(encoder, test.images, device)
    metrics = probe_accuracy(train_tokens, train, test_tokens, test, settings)
    locca = encoder.run_config.get("loss", {})
    if locca.get("name") == "siglip_locca" and hasattr(encoder.model, "decode"):
        metrics["decoder_referring_acc_iou50"] = decoder_referring_accuracy(
            encoder, test, device, int(locca["locca"]["location_bins"]))
    return metrics
