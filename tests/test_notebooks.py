"""The notebooks run top to bottom offline (nbclient) and their final numbers make sense."""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

# Each notebook trains small models and fits a few hundred probes: minutes on a free CPU, more on a busy one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _execute(name: str, tmp_path, monkeypatch, **env: str) -> None:
    monkeypatch.setenv("CONTRASTIVE_NOTEBOOK_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "stored outputs"
    NotebookClient(notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()


def test_linear_probe_notebook(tmp_path, monkeypatch):
    results_path = tmp_path / "linear_probe.json"
    _execute("linear_probe.ipynb", tmp_path, monkeypatch, CONTRASTIVE_PROBE_RESULTS=str(results_path))
    results = json.loads(results_path.read_text())
    shots = results["shots"]
    assert list(shots) == ["1", "2", "4", "8", "16"]
    assert results["test_samples"] == 1024
    # Even a briefly trained tower separates Fashion-MNIST far above chance (0.1) with all the training data,
    # and more shots help.
    assert results["full"]["acc1"] > 0.5
    assert shots["16"]["plain"] > shots["1"]["plain"]
    assert 0 <= results["zeroshot"]["acc1"] <= 1


def test_layerwise_probe_notebook(tmp_path, monkeypatch):
    results_path = tmp_path / "layerwise.json"
    _execute("layerwise_probe.ipynb", tmp_path, monkeypatch, CONTRASTIVE_LAYERWISE_RESULTS=str(results_path))
    curves = json.loads(results_path.read_text())["curves"]
    assert "CLIP" in curves
    for label, accuracies in curves.items():
        assert len(accuracies) == 4, label  # the tiny towers have 4 blocks
        assert max(accuracies) > 0.5, (label, accuracies)
