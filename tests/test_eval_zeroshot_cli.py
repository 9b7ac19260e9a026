"""Zero-shot and retrieval on a trained tiny checkpoint: an independent re-implementation agrees to 1e-6, the CLI
writes one clip_benchmark JSON per (model, dataset) pair and a summary table, open_clip weights load, bad input
is named."""

from __future__ import annotations

import csv
import io
import json
import sys
import tarfile
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from contrastive.cli.eval import main as eval_main
from contrastive.encoders import load_encoder
from contrastive.eval.evaluators import build_evaluators
from contrastive.eval.zeroshot import ZeroShotClassification
from contrastive.config import EvalConfig, RetrievalDatasetConfig, ZeroShotDatasetConfig
from tests.conftest import run, tiny_run_overrides


@pytest.fixture(scope="module")
def checkpoint_run(demo_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("eval_run") / "run"
    result = run([sys.executable, "-m", "contrastive.cli.train", *tiny_run_overrides(demo_root, run_dir),
                  "trainer.max_steps=6", "trainer.checkpoint_every=3"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _straightforward_acc1(model, tokenizer, root: Path) -> float:
    """Plain loops: tar members -> PIL -> resize/crop/normalise -> cosine similarity with per-class prompt means."""
    classnames = (root / "classnames.txt").read_text().split("\n")
    classnames = [c.strip() for c in classnames if c.strip()]
    templates = [t.strip() for t in (root / "zeroshot_classification_templates.txt").read_text().splitlines() if t.strip()]
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    transform = v2.Compose([v2.PILToTensor(), v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(model.cfg.image_mean, model.cfg.image_std)])
    with torch.no_grad():
        class_vectors = []
        for name in classnames:
            prompts = tokenizer([t.replace("{c}", name) for t in templates])
            class_vectors.append(F.normalize(F.normalize(model.clip.encode_text(prompts), dim=-1).mean(0), dim=0))
        classifier = torch.stack(class_vectors)
        correct = total = 0
        for shard in sorted((root / "test").glob("*.tar"), key=lambda p: int(p.stem)):
            members: dict[str, dict[str, bytes]] = {}
            with tarfile.open(shard) as archive:
                for member in archive.getmembers():
                    key, ext = member.name.split(".", 1)
                    members.setdefault(key, {})[ext] = archive.extractfile(member).read()
            for sample in members.values():
                image = transform(Image.open(io.BytesIO(sample["png"])).convert("RGB"))[None]
                feature = F.normalize(model.clip.encode_image(image), dim=-1)
                correct += int((feature @ classifier.T).argmax().item() == int(sample["cls"]))
                total += 1
    return correct / total


def test_zeroshot_acc1_matches_a_straightforward_implementation(checkpoint_run, demo_root):
    encoder = load_encoder(checkpoint_run)
    ours = ZeroShotClassification("fm", demo_root, "test", batch_size=100).run(encoder, torch.device("cpu"))
    assert ours["acc1"] == pytest.approx(_straightforward_acc1(encoder.model, encoder.tokenizer, demo_root), abs=1e-6)


def test_cli_writes_one_result_per_pair_and_a_summary(checkpoint_run, demo_root, tmp_path):
    steps = sorted((checkpoint_run / "checkpoints").glob("*.pt"))
    assert len(steps) == 2
    out = tmp_path / "results"
    code = eval_main(["zeroshot", "--checkpoint", *map(str, steps), "--dataset-root", str(demo_root),
                      "--output-dir", str(out), "--workers", "0", "--no-progress", "--batch-size", "128"])
    assert code == 0
    results = sorted(out.glob("*.json"))
    assert [p.name for p in results] == ["debug-step_00000003__fashion-mnist.json",
                                         "debug-step_00000006__fashion-mnist.json"]
    record = json.loads(results[0].read_text())
    assert record.keys() == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert record["task"] == "zeroshot_classification" and record["pretrained"] == str(steps[0])
    assert set(record["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["pretrained"] for r in rows] == [str(s) for s in steps]
    assert float(rows[0]["acc1"]) == pytest.approx(record["metrics"]["acc1"], abs=1e-6)


def test_retrieval_cli_and_training_evaluators(checkpoint_run, demo_root, tmp_path):
    out = tmp_path / "r.json"
    assert eval_main(["retrieval", "--checkpoint", str(checkpoint_run), "--dataset-root", str(demo_root),
                      "--output", str(out), "--workers", "0", "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["task"] == "zeroshot_retrieval"
    assert set(record["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    cfg = EvalConfig(zeroshot=[ZeroShotDatasetConfig("fm", str(demo_root))],
                     retrieval=[RetrievalDatasetConfig("fm-captions", str(demo_root))], batch_size=128)
    evaluators = build_evaluators(cfg)
    assert [e.name for e in evaluators] == ["fm", "fm-captions"]
    assert evaluators[1].run(load_encoder(checkpoint_run), torch.device("cpu")) == pytest.approx(record["metrics"], abs=1e-6)


def test_open_clip_weights_load_and_wrong_ones_are_named(checkpoint_run, demo_root, tmp_path, capsys):
    encoder = load_encoder(checkpoint_run)
    model, run = encoder.model, encoder.run_config
    vision, text = dict(run["model"]["vision"]), dict(run["model"]["text"])
    config = {"embed_dim": run["model"]["embed_dim"], "vision_cfg": vision, "text_cfg": text}
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    weights = tmp_path / "tiny.pt"
    torch.save({k.removeprefix("clip."): v for k, v in model.state_dict().items()}, weights)
    out = tmp_path / "oc.json"
    args = ["zeroshot", "--dataset-root", str(demo_root), "--workers", "0", "--no-progress"]
    assert eval_main([*args, "--open-clip", "tiny-test-clip", str(weights), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["model"] == "tiny-test-clip"
    torch.save({"visual.proj": torch.zeros(3, 3)}, tmp_path / "other.pt")
    assert eval_main([*args, "--open-clip", "tiny-test-clip", str(tmp_path / "other.pt")]) == 2
    assert "do not fit open_clip model tiny-test-clip" in capsys.readouterr().err
    assert eval_main([*args, "--checkpoint", str(weights)]) == 2
    assert "is not a contrastive checkpoint" in capsys.readouterr().err


def test_cli_names_bad_input(checkpoint_run, demo_root, tmp_path, capsys):
    args = ["zeroshot", "--checkpoint", str(checkpoint_run), "--workers", "0", "--no-progress"]
    root = tmp_path / "ds"
    (root / "test").mkdir(parents=True)
    (root / "test" / "0.tar").write_bytes((demo_root / "test" / "0.tar").read_bytes())
    assert eval_main([*args, "--dataset-root", str(root)]) == 2
    error = capsys.readouterr().err
    assert "class name file" in error and "classnames.txt does not exist" in error
    assert eval_main([*args, "--dataset-root", str(root), "--classnames", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt' is neither a file nor a built-in list" in capsys.readouterr().err
    (root / "templates.txt").write_text("a photo of a thing.\n")
    assert eval_main([*args, "--dataset-root", str(root), "--classnames", "cifar10",
                      "--templates", str(root / "templates.txt")]) == 2
    assert "has no {c} (or {}) placeholder" in capsys.readouterr().err
    (root / "test" / "1.tar").write_bytes(b"")
    assert eval_main([*args, "--dataset-root", str(root), "--classnames", "cifar10", "--templates", "simple"]) == 2
    assert "1.tar is empty (0 bytes)" in capsys.readouterr().err
