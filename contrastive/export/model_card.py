"""The README.md model card written into every export: architecture, training recipe, data, steps, metrics."""

from __future__ import annotations

import json
from pathlib import Path

from contrastive.data.transforms import Preprocess
from contrastive.export.base import Exported


def run_metrics(run_dir: Path) -> tuple[dict | None, list[dict]]:
    """(the last training-log record of metrics.jsonl, every clip_benchmark-shaped result JSON in the run dir)."""
    last = None
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else None
    results = []
    for path in sorted(run_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and isinstance(record.get("metrics"), dict):
            results.append({"file": path.name, **record})
    return last, results


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(exported: Exported, run: dict, preprocess: Preprocess) -> str:
    model, data, loss, optim = run.get("model", {}), run.get("data", {}), run.get("loss", {}), run.get("optim", {})
    run_dir = Path(run["checkpoint"]).parent.parent
    sources = ", ".join(f"{s.get('name')} (`{s.get('shards')}`, weight {s.get('weight')})"
                        for s in data.get("sources", []))
    last, results = run_metrics(run_dir)
    sections = [
        f"# {run.get('name', 'model')} — {exported.format} export\n",
        "Exported by `contrastive-export` from a `contrastive` training run.\n",
        "## Architecture\n",
        f"{exported.architecture}.\n",
        _table([("model.arch", model.get("arch")), ("open_clip base config", model.get("open_clip_name") or "none"),
                ("embed_dim", model.get("embed_dim")), ("quick_gelu", model.get("quick_gelu")),
                ("vision tower", f"`{json.dumps(model.get('vision', {}))}`"),
                ("text tower", f"`{json.dumps(model.get('text', {}))}`")]) + "\n",
        "## Preprocessing\n",
        f"Resize the shorter side to {preprocess.image_size} ({preprocess.interpolation}), centre crop "
        f"{preprocess.image_size}x{preprocess.image_size}, scale to [0, 1], normalise with mean {preprocess.mean} "
        f"and std {preprocess.std}.\n",
        *([f"{exported.preprocessing_note}\n"] if exported.preprocessing_note else []),
        "## Training\n",
        _table([("loss", loss.get("name")), ("data", sources or "unknown"),
                ("global batch size", data.get("batch_size")),
                ("optimizer", f"{optim.get('optimizer')} lr {optim.get('lr')} wd {optim.get('weight_decay')}"),
                ("steps", run.get("step")), ("checkpoint", f"`{run['checkpoint']}`"),
                ("weights", "exponential moving average" if run.get("weights") == "ema" else "trained")]) + "\n",
        "## Evaluation\n",
    ]
    if results:
        for result in results:
            metrics = ", ".join(f"{k} {_number(v)}" for k, v in result["metrics"].items())
            sections.append(f"- {result.get('task', 'result')} on {result.get('dataset')} "
                            f"(`{result['file']}`): {metrics}")
        sections.append("")
    else:
        sections.append(f"No evaluation results were found in the run directory `{run_dir}`.\n")
    if last:
        sections.append("Last training-log record (`metrics.jsonl`): "
                        + ", ".join(f"{k} {_number(v)}" for k, v in last.items()) + "\n")
    sections += ["## Usage\n", "```python", exported.usage.replace("EXPORT_DIR", "'path/to/this/directory'"), "```", ""]
    return "\n".join(sections)
