"""benchmarks/naflex_throughput.py at smoke size: it runs and reports what it promises (both arms, padding, tokens
per image, ratios measured in the same run, the command). Only the mechanism is checked, never which arm is faster."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_naflex_throughput_smoke_run_reports_both_arms_padding_and_ratios(tmp_path):
    report_path = tmp_path / "naflex_throughput.json"
    assert _benchmark("naflex_throughput").main(["--smoke", "--work-dir", str(tmp_path), "--json",
                                                 str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["command"].startswith("python benchmarks/naflex_throughput.py --smoke")
    result = report["results"]["16"]
    assert result["fixed"]["padding_fraction"] == 0 and 0 <= result["naflex"]["padding_fraction"] < 1
    assert result["fixed"]["tokens_per_image"] == 16 and result["naflex"]["tokens_per_image"] <= 16
    for key, ratio in result["naflex_over_fixed"].items():
        assert ratio == pytest.approx(result["naflex"][key] / result["fixed"][key])


@pytest.mark.slow
def test_naflex_quality_smoke_run_trains_three_arms_at_equal_image_tokens(tmp_path):
    """Mechanisms only: the three arms run on the same canvases (native for NaFlex, the central square or the
    squashed canvas for the fixed arms), their image tokens are the budget L=16 (fixed: the whole 4 x 4 grid;
    NaFlex: the valid patches, at most L), and the JSON holds the metrics, the 2-sigma verdict, commit and command."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    report_path = tmp_path / "naflex_quality.json"
    assert _benchmark("naflex_quality").main(["--smoke", "--work-dir", str(tmp_path), "--json",
                                              str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["command"].startswith("python benchmarks/naflex_quality.py --smoke")
    assert len(report["commit"]) >= 7 and set(report["load_average"]) == {"before", "after"}
    assert [run["arm"] for run in report["runs"]] == ["naflex", "center_crop", "squash"]

    def samples(arm: str) -> list[tuple[np.ndarray, str]]:
        with tarfile.open(tmp_path / "canvases" / arm / "test" / "0.tar") as tar:
            files = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
        keys = sorted(name[:-4] for name in files if name.endswith(".png"))
        return [(np.asarray(Image.open(io.BytesIO(files[f"{key}.png"]))), files[f"{key}.txt"].decode())
                for key in keys]

    native, center, squashed = samples("naflex"), samples("center_crop"), samples("squash")
    assert len(native) == 16 and {canvas.shape for canvas, _ in native} <= {(28, 56), (56, 28), (28, 84), (84, 28)}
    for (canvas, caption), (crop, crop_caption), (squash, squash_caption) in zip(native, center, squashed):
        assert caption == crop_caption == squash_caption
        assert caption.count(", then a ") == max(canvas.shape) // 28 - 1  # one name per item
        top, left = (canvas.shape[0] - 28) // 2, (canvas.shape[1] - 28) // 2
        np.testing.assert_array_equal(crop, canvas[top:top + 28, left:left + 28])
        assert squash.shape == (28, 28)
    by_arm = {run["arm"]: run for run in report["runs"]}
    # 4 x 4 patches of 7 px for the fixed arms; NaFlex keeps the aspect: 28 x 56 px fits 3 x 5 patches within 16,
    # 28 x 84 px 2 x 6 (by hand from Siglip2ImageProcessor's rule), so its valid tokens are 12 or 15.
    assert by_arm["center_crop"]["image_tokens_per_image_max"] == by_arm["squash"]["image_tokens_per_image_max"] == 16
    assert by_arm["center_crop"]["image_tokens_per_image_mean"] == by_arm["squash"]["image_tokens_per_image_mean"] == 16
    assert 12 <= by_arm["naflex"]["image_tokens_per_image_mean"] <= by_arm["naflex"]["image_tokens_per_image_max"] <= 15
    summary = report["summary"]
    for run in report["runs"]:
        assert 0 <= run["retrieval_recall1"] <= 1 and 0 <= run["zeroshot_acc1"] <= 1
    assert summary["retrieval_recall1_naflex_minus_squash"] == pytest.approx(
        by_arm["naflex"]["retrieval_recall1"] - by_arm["squash"]["retrieval_recall1"])
    assert summary["retrieval_recall1_naflex_minus_center_crop_counts"] is False  # one seed: nothing counts
