"""The pictures of a model report, each as a PNG data URI: matplotlib figures (training curves, confusion matrix,
per-class accuracy) and dataset images turned back from the encoder's preprocessing into pixels."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
from PIL import Image

from contrastive.data.transforms import Preprocess

FIGURE_DPI = 72


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    return png_uri(buffer.getvalue())


def image_uri(image: torch.Tensor, preprocess: Preprocess, size: int = 64) -> str:
    """A preprocessed image (3, H, W) as the model saw it, un-normalised and shown at `size` pixels."""
    mean = torch.tensor(preprocess.mean).view(3, 1, 1)
    std = torch.tensor(preprocess.std).view(3, 1, 1)
    pixels = ((image.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return png_uri(buffer.getvalue())


# Panels of the training-curve figure: (title, does this metrics.jsonl key belong to it).
CURVE_PANELS = (
    ("loss terms", lambda key: key.endswith("loss")),
    ("logit scale and bias", lambda key: key in ("logit_scale", "logit_bias")),
    ("learning rate", lambda key: key == "lr"),
    ("throughput (samples/s)", lambda key: key == "samples_per_second"),
    ("skipped data, by reason", lambda key: key.startswith("data_") or key == "nonfinite_steps_skipped"),
    ("gradient norm", lambda key: key == "grad_norm"),
)


def curves_uri(rows: list[dict]) -> str:
    """One panel per CURVE_PANELS entry, each series against the step; rows sorted by step, one per step."""
    figure = Figure(figsize=(12, 6))
    axes = figure.subplots(2, 3)
    keys = sorted({key for row in rows for key in row if key != "step"})
    for axis, (title, belongs) in zip(axes.flat, CURVE_PANELS):
        for key in filter(belongs, keys):
            points = [(row["step"], row[key]) for row in rows if key in row]
            axis.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
        axis.set_title(title)
        axis.set_xlabel("step")
        if axis.lines:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    return figure_uri(figure)


def confusion_uri(matrix: np.ndarray, classnames: list[str]) -> str:
    size = max(4.0, 0.45 * len(classnames))
    figure = Figure(figsize=(size + 1, size))
    axis = figure.subplots()
    shown = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(shown, ax=axis, label="images")
    if len(classnames) <= 50:
        axis.set_xticks(range(len(classnames)), classnames, rotation=90, fontsize=8)
        axis.set_yticks(range(len(classnames)), classnames, fontsize=8)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    return figure_uri(figure)


def per_class_uri(accuracies: np.ndarray, classnames: list[str]) -> str:
    figure = Figure(figsize=(max(4.0, 0.35 * len(classnames)), 3))
    axis = figure.subplots()
    axis.bar(range(len(classnames)), accuracies)
    if len(classnames) <= 50:
        axis.set_xticks(range(len(classnames)), classnames, rotation=90, fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_ylabel("top-1 accuracy")
    return figure_uri(figure)


def patch_maps_uri(images: list[torch.Tensor], maps: list[torch.Tensor], titles: list[str],
                   preprocess: Preprocess) -> str:
    """Each image (3, H, W) as the model saw it, its (grid, grid) cosine map laid over it."""
    figure = Figure(figsize=(2.4 * len(images), 2.6))
    axes = np.atleast_1d(figure.subplots(1, len(images)))
    mean = torch.tensor(preprocess.mean).view(3, 1, 1)
    std = torch.tensor(preprocess.std).view(3, 1, 1)
    for axis, image, similarity, title in zip(axes, images, maps, titles):
        pixels = (image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        height, width = pixels.shape[:2]
        axis.imshow(pixels)
        shown = axis.imshow(similarity.numpy(), cmap="jet", alpha=0.45, extent=(0, width, height, 0),
                            interpolation="nearest")
        figure.colorbar(shown, ax=axis, fraction=0.046, label="cosine")
        axis.set_title(title, fontsize=8)
        axis.axis("off")
    return figure_uri(figure)
