"""`contrastive-eval report`: the HTML renders for CLIP, SigLIP, CapPa, CoCa and an open_clip export; it parses,
references nothing outside itself, its images decode, it fits its size budget, its numbers equal the
`contrastive-eval` JSON, and headless Chromium draws it as a page that is not blank."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from contrastive.cli.eval import main as eval_main
from contrastive.cli.export import main as export_main
from contrastive.config import ModelConfig
from contrastive.data.demo import build_demo_dataset
from contrastive.encoders import load_encoder
from contrastive.eval.patch_maps import patch_embeddings
from contrastive.eval.report import training_rows
from contrastive.models import build_model
from tests.conftest import compose_config, run, tiny_run_overrides

SIZE_BUDGET_BYTES = 1_000_000  # one model on a 10-class dataset; README states it
BROWSERS = ("chromium", "chromium-headless-shell")


class ReportParser(HTMLParser):
    """Every tag's attributes, and the exact metric values of the tables (data-metric / data-value)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.sections: list[str] = []
        self.metrics: dict[str, dict[str, float]] = {}
        self.table_task: str | None = None
        self.confusion: list[list[int]] = []
        self.in_confusion = False
        self.in_h2 = False
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "table":
            self.table_task = attributes.get("data-task")
            self.in_confusion = attributes.get("class") == "confusion"
        if tag == "tr" and self.in_confusion:
            self.confusion.append([])
        if tag == "td" and self.in_confusion:
            self.cell = []
        if tag == "td" and self.table_task and "data-metric" in attributes:
            self.metrics.setdefault(self.table_task, {})[attributes["data-metric"]] = float(attributes["data-value"])
        self.in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        if tag == "table":
            self.table_task, self.in_confusion = None, False
        if tag == "td" and self.cell is not None:
            self.confusion[-1].append(int("".join(self.cell)))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        if self.in_h2:
            self.sections.append(data)
            self.in_h2 = False


def parse_report(path: Path) -> ReportParser:
    text = path.read_text()
    parser = ReportParser()
    parser.feed(text)
    return parser


def check_self_contained(path: Path, images_expected: bool = True) -> ReportParser:
    """Parses; every <img> is a PNG data URI PIL decodes; no scripts, links, frames or URLs outside the file."""
    assert path.stat().st_size <= SIZE_BUDGET_BYTES
    text = path.read_text()
    for external in ("http://", "https://", "file:", "//cdn", "@import", "url("):
        assert external not in text
    report = parse_report(path)
    assert not [tag for tag, _ in report.tags if tag in ("script", "link", "iframe", "object", "embed")]
    images = [attributes for tag, attributes in report.tags if tag == "img"]
    assert bool(images) == images_expected
    for attributes in images:
        prefix = "data:image/png;base64,"
        assert attributes["src"].startswith(prefix)
        picture = Image.open(io.BytesIO(base64.b64decode(attributes["src"][len(prefix):], validate=True)))
        picture.load()
        assert picture.size[0] > 0 and picture.size[1] > 0
    assert not [a for _, a in report.tags for key in ("href", "srcset", "action") if key in a]
    return report


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """96 train and 96 test demo samples in shards of 32: enough for every class, cheap to evaluate."""
    root = tmp_path_factory.mktemp("report_data") / "fashion-mnist"
    build_demo_dataset(root, samples_per_shard=32, limit=96)
    return root


@pytest.fixture(scope="module")
def clip_run(small_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("report_clip") / "run"
    result = run([sys.executable, "-m", "contrastive.cli.train", *tiny_run_overrides(small_root, run_dir)],
                 timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def untrained_checkpoint(experiment: str, out: Path, overrides: tuple[str, ...] = ()) -> Path:
    """A checkpoint file of the experiment's model at its initialisation, in the layout training writes."""
    config = OmegaConf.to_container(compose_config([f"experiment={experiment}", *overrides]), resolve=True)
    torch.manual_seed(0)
    model = build_model(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), config["model"])))
    path = out / "checkpoints" / "step_00000000.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": config, "step": 0}, path)
    return path


@pytest.fixture(scope="module")
def clip_report(clip_run, small_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_html") / "report.html"
    assert eval_main(["report", "--checkpoint", str(clip_run), "--dataset-root", str(small_root),
                      "--out", str(out)]) == 0
    return out


def test_clip_report_is_self_contained_and_holds_every_section(clip_report):
    report = check_self_contained(clip_report)
    assert report.sections == ["Model facts", "Training curves", "Zero-shot classification", "Retrieval",
                               "Patch-text similarity maps"]
    assert "too coarse" in clip_report.read_text()  # the demo's 28 px images are a 4x4 grid of patches


def test_report_figures_equal_the_eval_json_and_the_shards_labels(clip_run, clip_report, small_root, tmp_path):
    report = parse_report(clip_report)
    for command, task in (("zeroshot", "zeroshot_classification"), ("retrieval", "zeroshot_retrieval")):
        out = tmp_path / f"{command}.json"
        assert eval_main([command, "--checkpoint", str(clip_run), "--dataset-root", str(small_root),
                          "--output", str(out), "--workers", "0", "--no-progress"]) == 0
        assert report.metrics[task] == json.loads(out.read_text())["metrics"]
    labels = []
    for shard in sorted((small_root / "test").glob("*.tar")):
        with tarfile.open(shard) as archive:
            labels += [int(archive.extractfile(m).read()) for m in archive.getmembers() if m.name.endswith(".cls")]
    confusion = np.array(report.confusion[1:])  # the first row holds the class names
    assert confusion.sum(axis=1).tolist() == np.bincount(labels, minlength=10).tolist()
    acc1 = json.loads((tmp_path / "zeroshot.json").read_text())["metrics"]["acc1"]
    assert torch.tensor(np.trace(confusion) / len(labels), dtype=torch.float32).item() == acc1


def test_steps_repeated_after_a_resume_keep_their_last_line_and_a_cut_line_is_skipped(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 9.0},
             {"step": 2, "loss": 2.5}, {"step": 3, "loss": 1.5}, {"step": 4, "loss": 1.0}]
    cut_short = '{"step": 5, "lo'  # a run killed mid-write
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + cut_short)
    rows, count, unreadable = training_rows(tmp_path)
    assert (count, unreadable) == (7, 1)
    assert [(row["step"], row["loss"]) for row in rows] == [(1, 3.0), (2, 2.5), (3, 1.5), (4, 1.0)]


@pytest.mark.parametrize("experiment, sections", [
    ("demo_siglip", {"Retrieval"}),
    ("demo_cappa", {"Generated captions"}),
    ("demo_coca", {"Retrieval", "Generated captions"}),
])
def test_report_renders_for_each_model_kind(experiment, sections, small_root, tmp_path):
    checkpoint = untrained_checkpoint(experiment, tmp_path / "run")
    out = tmp_path / "report.html"
    assert eval_main(["report", "--checkpoint", str(checkpoint), "--dataset-root", str(small_root),
                      "--out", str(out)]) == 0
    report = check_self_contained(out)
    assert sections <= set(report.sections)
    assert "Zero-shot classification" in report.sections
    if experiment == "demo_cappa":
        assert "no text embedding to retrieve with" in out.read_text()
        assert report.metrics["zeroshot_classification"]


def test_open_clip_export_report_compared_with_its_checkpoint(clip_run, small_root, tmp_path):
    export = tmp_path / "open_clip"
    assert export_main(["--checkpoint", str(clip_run), "--format", "open_clip", "--out", str(export)]) == 0
    out = tmp_path / "report.html"
    assert eval_main(["report", "--checkpoint", str(export), "--compare", str(clip_run),
                      "--dataset-root", str(small_root), "--out", str(out)]) == 0
    check_self_contained(out)
    text = out.read_text()
    assert "open_clip" in text and "no metrics.jsonl beside" in text
    # side by side: each section holds one column per model
    parser = ReportParser()
    parser.feed(text)
    assert text.count("class='model'") == 2 * len(parser.sections)


def test_maskclip_patch_embeddings_equal_the_last_block_attending_each_token_only_to_itself(tmp_path):
    """Independent route: open_clip's own last block input, its nn.MultiheadAttention with a diagonal mask (each
    token's output is then exactly its projected value), the final norm and the projection."""
    checkpoint = untrained_checkpoint("demo", tmp_path / "run", ("model.vision.image_size=56",))
    visual = load_encoder(checkpoint).model.visual
    images = torch.randn(2, 3, 56, 56)
    last = visual.transformer.resblocks[-1]
    inputs = []
    handle = last.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        visual(images)
        handle.remove()
        normed = last.ln_1(inputs[0])
        length = normed.shape[1]
        diagonal = torch.full((length, length), float("-inf")).fill_diagonal_(0.0)
        attended = last.attn(normed, normed, normed, attn_mask=diagonal, need_weights=False)[0]
        expected = torch.nn.functional.normalize(visual.ln_post(last.ls_1(attended)[:, 1:]) @ visual.proj, dim=-1)
    assert torch.allclose(patch_embeddings(visual, images).view(2, 64, -1), expected, atol=1e-5)


def test_report_draws_patch_maps_for_a_fine_enough_grid(small_root, tmp_path):
    checkpoint = untrained_checkpoint("demo", tmp_path / "run", ("model.vision.image_size=56",))  # 8x8 patches
    out = tmp_path / "report.html"
    assert eval_main(["report", "--checkpoint", str(checkpoint), "--dataset-root", str(small_root),
                      "--out", str(out)]) == 0
    check_self_contained(out)
    text = out.read_text()
    assert "MaskCLIP-style" in text and 'alt="patch maps"' in text and "too coarse" not in text


def test_image_only_transformers_export_gets_its_facts_and_says_what_it_cannot_show(clip_run, small_root, tmp_path):
    export = tmp_path / "hf"
    assert export_main(["--checkpoint", str(clip_run), "--format", "transformers", "--out", str(export)]) == 0
    out = tmp_path / "report.html"
    assert eval_main(["report", "--checkpoint", str(export), "--dataset-root", str(small_root),
                      "--out", str(out)]) == 0
    report = check_self_contained(out, images_expected=False)
    assert "Zero-shot classification" in report.sections and not report.metrics
    assert "is image-only: no text tower" in out.read_text() and "total parameters" in out.read_text()


def browser() -> str:
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.fail("no headless Chromium: `make browser` installs Debian's chromium (apt-get install -y chromium); "
                    "`make test` runs it first")
    return found


def test_headless_chromium_draws_a_page_that_is_not_blank(clip_report, tmp_path):
    shot = tmp_path / "shot.png"
    result = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                             "--window-size=1200,2000", clip_report.resolve().as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2000, 1200)
    assert (pixels < 128).mean() > 0.01  # text and plots drawn in dark ink on the white page
    assert len(np.unique(pixels)) > 50  # plots and images, not one flat colour
