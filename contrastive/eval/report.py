"""A self-contained HTML report of one model (or two side by side): model facts, training curves, zero-shot
confusions, retrieval hits and misses, generated captions and what patch-text similarity maps can show.

Every number comes from the evaluators' own computations (ZeroShotClassification.scores, ZeroShotRetrieval.features,
caption_dataset), so the report's accuracies and recalls are those `contrastive-eval` writes. Images are inlined
as PNG data URIs; the file references nothing outside itself and runs no scripts.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from contrastive.encoders import LoadedEncoder, load_encoder
from contrastive.errors import InputError
from contrastive.eval import report_figures as figures
from contrastive.eval.captioning import caption_dataset
from contrastive.eval.datasets import EvalDataset
from contrastive.eval.features import ImageFeatures, encode_images
from contrastive.eval.patch_maps import METHOD, patch_embeddings, patch_map_note
from contrastive.eval.retrieval import ZeroShotRetrieval, retrieval_metrics
from contrastive.eval.zeroshot import ZeroShotClassification, build_classifier, classification_metrics

CONFUSED_PAIRS = 5
EXAMPLES_PER_PAIR = 4
RETRIEVAL_QUERIES = 4
TOP_K = 5
CAPTIONS = 8
PATCH_MAPS = 4
Draw = Callable[[dict[int, torch.Tensor]], str]  # a section's HTML, given the example images it asked for
# open_clip's top-level module names -> the tower they belong to; other names are shown as they are.
TOWERS = {"visual": "image tower", "transformer": "text tower", "token_embedding": "text tower",
          "positional_embedding": "text tower", "ln_final": "text tower", "text_projection": "text tower",
          "text": "text tower", "text_decoder": "caption decoder", "logit_scale": "logit scale and bias",
          "logit_bias": "logit scale and bias"}
STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h2 { border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 2px 6px; font-size: 13px; text-align: left; vertical-align: top; }
.cols { display: flex; gap: 2em; } .cols > div { flex: 1; min-width: 0; overflow-x: auto; }
img.thumb { border: 3px solid transparent; image-rendering: pixelated; }
img.hit, td.hit { border-color: #2a2; background: #dfd; } img.miss { border-color: #c33; }
img.plot { max-width: 100%; } .note { color: #666; font-style: italic; }
"""


@dataclass
class ModelReport:
    name: str
    sections: dict[str, str] = field(default_factory=dict)  # title -> HTML


def _esc(value) -> str:
    return html.escape(str(value))


def _number(value: float, metric: str) -> str:
    """A table cell that shows 4 decimals and keeps the exact value for machines (data-value, Python's repr)."""
    return f'<td data-metric="{_esc(metric)}" data-value="{value!r}">{value:.4f}</td>'


def _metrics_table(task: str, metrics: dict[str, float]) -> str:
    rows = "".join(f"<tr><th>{_esc(name)}</th>{_number(value, name)}</tr>" for name, value in metrics.items())
    return f'<table class="metrics" data-task="{task}">{rows}</table>'


def _img(uri: str, css: str = "thumb", title: str = "") -> str:
    return f'<img class="{css}" src="{uri}" alt="{_esc(title)}" title="{_esc(title)}">'


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def fetch_images(dataset: EvalDataset, encoder: LoadedEncoder, indices: Iterable[int],
                 batch_size: int) -> dict[int, torch.Tensor]:
    """The preprocessed images (3, H, W) at these dataset positions, read in one pass that stops when all are found."""
    wanted, found, position = set(indices), {}, 0
    if not wanted:
        return found
    for images, _, _, _ in dataset.loader(encoder.preprocess, batch_size):
        for offset in range(len(images)):
            if position + offset in wanted:
                found[position + offset] = images[offset]
        position += len(images)
        if len(found) == len(wanted):
            break
    return found


def training_rows(run_dir: Path) -> tuple[list[dict], int, int]:
    """(one row per step from metrics.jsonl, the last one logged for a step repeated after a resume; line count;
    unreadable lines, such as one cut short when a run was killed mid-write, which are skipped)."""
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step: dict[int, dict] = {}
    unreadable = 0
    for line in lines:
        try:
            row = json.loads(line)
            by_step[int(row["step"])] = row
        except (ValueError, KeyError, TypeError):
            unreadable += 1
    return [by_step[step] for step in sorted(by_step)], len(lines), unreadable


def facts_section(encoder: LoadedEncoder) -> str:
    model = encoder.model
    inner = dict(model.named_children())
    root = next(iter(inner.values())) if len(inner) == 1 else model  # our wrappers hold one open_clip module
    counts: dict[str, int] = {}
    for name, parameter in root.named_parameters():
        tower = TOWERS.get(name.split(".")[0], name.split(".")[0])
        counts[tower] = counts.get(tower, 0) + parameter.numel()
    config = encoder.run_config
    facts = {"name": encoder.name, "format": encoder.kind, "source": encoder.source,
             "model class": type(model).__name__, "logit scale": encoder.logit_scale, "logit bias": encoder.logit_bias,
             "step": config.get("step"), "samples seen": config.get("samples_seen"),
             "git commit": config.get("git_commit"), "total parameters": sum(counts.values())}
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts.items() if v is not None)
    towers = "".join(f"<tr><th>{_esc(k)}</th><td>{v:,}</td></tr>" for k, v in counts.items())
    body = f"<table>{rows}</table><h3>Parameters per tower</h3><table>{towers}</table>"
    if config:
        shown = {k: v for k, v in config.items() if k not in ("step", "samples_seen", "git_commit")}
        body += f"<details><summary>run config</summary><pre>{_esc(json.dumps(shown, indent=1))}</pre></details>"
    return body


def curves_section(encoder: LoadedEncoder) -> str:
    checkpoint = encoder.run_config.get("checkpoint")
    run_dir = Path(checkpoint).parent.parent if checkpoint else None
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return _note(f"no metrics.jsonl beside {encoder.source} (training curves exist for runs of ours)")
    rows, lines, unreadable = training_rows(run_dir)
    if not rows:
        return _note(f"{run_dir / 'metrics.jsonl'} holds no readable step")
    skipped = f"; {unreadable} unreadable line(s) skipped" if unreadable else ""
    return (_note(f"{run_dir / 'metrics.jsonl'}: {lines} lines, {len(rows)} steps after keeping the last line of "
                  f"each step (steps repeated after a resume){skipped}")
            + _img(figures.curves_uri(rows), "plot", "training curves"))


def zeroshot_section(encoder: LoadedEncoder, evaluator: ZeroShotClassification, device: torch.device,
                     features: ImageFeatures | None) -> tuple[set[int], Draw]:
    scores, labels = evaluator.scores(encoder, device, features)
    metrics = classification_metrics(scores, labels)
    classnames = evaluator.dataset.classnames
    predictions = scores.argmax(dim=1)
    count = len(classnames)
    matrix = torch.bincount(labels * count + predictions, minlength=count * count).view(count, count).numpy()
    totals = matrix.sum(axis=1)
    accuracies = np.divide(np.diag(matrix), totals, out=np.zeros(count), where=totals > 0)
    body = _metrics_table("zeroshot_classification", metrics)
    body += _img(figures.confusion_uri(matrix, classnames), "plot", "confusion matrix")
    if count <= 50:
        head = "".join(f"<th>{_esc(name)}</th>" for name in classnames)
        cells = "".join(
            f"<tr><th>{_esc(classnames[t])}</th>" + "".join(f"<td>{n}</td>" for n in matrix[t]) + "</tr>"
            for t in range(count))
        body += f'<table class="confusion"><tr><th>true \\ predicted</th>{head}</tr>{cells}</table>'
    body += _img(figures.per_class_uri(accuracies, classnames), "plot", "per-class accuracy")
    body += "<table class='per-class'><tr><th>class</th><th>images</th><th>top-1 accuracy</th></tr>" + "".join(
        f"<tr><th>{_esc(classnames[c])}</th><td>{totals[c]}</td>{_number(float(accuracies[c]), 'class_acc1')}</tr>"
        for c in range(count)) + "</table>"
    off_diagonal = matrix.copy()
    np.fill_diagonal(off_diagonal, 0)
    pairs = [divmod(int(i), count) for i in np.argsort(-off_diagonal, axis=None, kind="stable")[:CONFUSED_PAIRS]]
    pairs = [(t, p) for t, p in pairs if off_diagonal[t, p] > 0]
    examples = {pair: (((labels == pair[0]) & (predictions == pair[1])).nonzero()[:EXAMPLES_PER_PAIR, 0]).tolist()
                for pair in pairs}

    def draw(images: dict[int, torch.Tensor]) -> str:
        rows = "".join(
            f"<tr><td>{_esc(classnames[t])}</td><td>{_esc(classnames[p])}</td><td>{matrix[t, p]}</td><td>"
            + "".join(_img(figures.image_uri(images[i], encoder.preprocess), title=f"sample {i}")
                      for i in examples[(t, p)]) + "</td></tr>" for t, p in pairs)
        return body + ("<h3>Most-confused pairs</h3><table><tr><th>true</th><th>predicted</th><th>images</th>"
                       f"<th>examples</th></tr>{rows}</table>")
    return {i for found in examples.values() for i in found}, draw


def retrieval_section(encoder: LoadedEncoder, evaluator: ZeroShotRetrieval, device: torch.device,
                      features: ImageFeatures | None) -> tuple[set[int], Draw]:
    images, text_features, texts, text_to_image = evaluator.features(encoder, device, features)
    body = _metrics_table("zeroshot_retrieval", retrieval_metrics(images.features, text_features, text_to_image))
    generator = torch.Generator().manual_seed(0)
    image_queries = torch.randperm(len(images.features), generator=generator)[:RETRIEVAL_QUERIES].tolist()
    text_queries = torch.randperm(len(texts), generator=generator)[:RETRIEVAL_QUERIES].tolist()
    top_images = {q: (text_features[q] @ images.features.T).topk(min(TOP_K, len(images.features))).indices.tolist()
                  for q in text_queries}
    top_texts = {q: (images.features[q] @ text_features.T).topk(min(TOP_K, len(texts))).indices.tolist()
                 for q in image_queries}
    needed = set(image_queries) | {i for found in top_images.values() for i in found}

    def draw(examples: dict[int, torch.Tensor]) -> str:
        pictures = {i: figures.image_uri(examples[i], encoder.preprocess) for i in needed}
        rows = "".join(
            f"<tr><td>{_img(pictures[q], title=images.keys[q])}</td>" + "".join(
                f"<td class='{'hit' if int(text_to_image[t]) == q else 'miss'}'>{_esc(texts[t])}</td>"
                for t in top_texts[q]) + "</tr>" for q in image_queries)
        captions_per_image = f"<h3>Top-{TOP_K} captions per sampled image (hits in green)</h3><table>{rows}</table>"
        rows = "".join(
            f"<tr><td>{_esc(texts[q])}</td><td>" + "".join(
                _img(pictures[i], "thumb " + ("hit" if int(text_to_image[q]) == i else "miss"), images.keys[i])
                for i in top_images[q]) + "</td></tr>" for q in text_queries)
        return (body + captions_per_image + f"<h3>Top-{TOP_K} images per sampled caption (hits framed green, "
                f"misses red)</h3><table>{rows}</table>")
    return needed, draw


def captions_section(encoder: LoadedEncoder, dataset: EvalDataset, device: torch.device, batch_size: int) -> str:
    loader = dataset.loader(encoder.preprocess, batch_size)
    records = caption_dataset(encoder.model, encoder.tokenizer, loader, device, CAPTIONS,
                              encoder.model.context_length)
    truth: dict[int, tuple[torch.Tensor, str]] = {}
    for images, captions, _, _ in dataset.loader(encoder.preprocess, batch_size):
        truth.update({len(truth) + i: (images[i], captions[i]) for i in range(min(len(images), CAPTIONS - len(truth)))})
        if len(truth) == CAPTIONS:
            break
    rows = "".join(
        f"<tr><td>{_img(figures.image_uri(truth[i][0], encoder.preprocess), title=r['key'])}</td>"
        f"<td>{_esc(r['caption'])}</td><td>{_esc(truth[i][1])}</td></tr>" for i, r in enumerate(records))
    return f"<table><tr><th>image</th><th>generated (greedy)</th><th>true caption</th></tr>{rows}</table>"


def patch_maps_section(encoder: LoadedEncoder, dataset: EvalDataset, device: torch.device) -> str:
    """Maps for the first PATCH_MAPS images against their true class's prompt-ensemble text embedding."""
    note = patch_map_note(encoder.model)
    if note is not None:
        return _note(note)
    classifier = build_classifier(encoder.model, encoder.tokenizer, dataset.classnames, dataset.templates, device)
    images, _, labels, _ = next(iter(dataset.loader(encoder.preprocess, PATCH_MAPS)))
    patches = patch_embeddings(encoder.model.visual, images.to(device))  # (B, grid, grid, D)
    maps = [(patches[i] @ classifier[int(label)].float()).cpu() for i, label in enumerate(labels.tolist())]
    titles = [dataset.classnames[int(label)] for label in labels]
    return (_note(f"Method: {METHOD}. Each image against its true class.")
            + _img(figures.patch_maps_uri(list(images), maps, titles, encoder.preprocess), "plot", "patch maps"))


def build_model_report(path: str, dataset_root: str, split: str = "test", device: torch.device | None = None,
                       batch_size: int = 256) -> ModelReport:
    device = device or torch.device("cpu")
    zeroshot = ZeroShotClassification(None, dataset_root, split, batch_size=batch_size)
    encoder = load_encoder(path, device=device)
    report = ModelReport(f"{encoder.name} ({encoder.source})")
    report.sections["Model facts"] = facts_section(encoder)
    report.sections["Training curves"] = curves_section(encoder)
    if encoder.tokenizer is None:  # an image-only export: nothing to compare images with
        for title in ("Zero-shot classification", "Retrieval", "Patch-text similarity maps"):
            report.sections[title] = _note(f"{encoder.name} ({encoder.kind}) is image-only: no text tower")
        return report
    # Zero-shot and retrieval read the same shards: their image features are encoded once, and the example images
    # both sections show are read back in one pass before either is drawn.
    two_tower = hasattr(encoder.model, "encode_text")
    features = (encode_images(encoder.model, zeroshot.dataset.loader(encoder.preprocess, batch_size), device)
                if two_tower and zeroshot.dataset.urls else None)
    pending = {"Zero-shot classification": zeroshot_section(encoder, zeroshot, device, features)}
    if not two_tower:
        retrieval_note = f"{type(encoder.model).__name__} has no text embedding to retrieve with"
    elif not zeroshot.dataset.urls:
        retrieval_note = "an image folder has no captions to retrieve"
    else:
        retrieval = ZeroShotRetrieval(None, dataset_root, split, batch_size=batch_size)
        try:
            pending["Retrieval"] = retrieval_section(encoder, retrieval, device, features)
            retrieval_note = None
        except InputError as error:  # shards without captions: the rest of the report still stands
            retrieval_note = str(error)
    examples = fetch_images(zeroshot.dataset, encoder, set().union(*(needed for needed, _ in pending.values())),
                            batch_size)
    for title, (_, draw) in pending.items():
        report.sections[title] = draw(examples)
    if retrieval_note is not None:
        report.sections["Retrieval"] = _note(retrieval_note)
    if hasattr(encoder.model, "decode"):
        report.sections["Generated captions"] = captions_section(encoder, zeroshot.dataset, device, batch_size)
    report.sections["Patch-text similarity maps"] = patch_maps_section(encoder, zeroshot.dataset, device)
    return report


def render_html(reports: list[ModelReport]) -> str:
    titles = list(dict.fromkeys(title for report in reports for title in report.sections))
    heading = " vs ".join(_esc(report.name) for report in reports)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Model report: {heading}</title>"
             f"<style>{STYLE}</style></head><body><h1>Model report</h1>"]
    for title in titles:
        columns = "".join(f"<div class='model'><h4>{_esc(report.name)}</h4>"
                          f"{report.sections.get(title, _note('not available'))}</div>" for report in reports)
        parts.append(f"<section><h2>{_esc(title)}</h2><div class='cols'>{columns}</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str, dataset_root: str, out: str | Path, compare: str | None = None, split: str = "test",
                 device: torch.device | None = None, batch_size: int = 256) -> Path:
    reports = [build_model_report(p, dataset_root, split, device, batch_size) for p in [path, compare] if p]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(reports))
    return out
