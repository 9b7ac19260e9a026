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
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import v2

from contrastive.cli.eval import main as eval_main
from contrastive.config import EvalConfig, ModelConfig, RetrievalDatasetConfig, ZeroShotDatasetConfig
from contrastive.encoders import load_encoder
from contrastive.eval.evaluators import build_evaluators
from contrastive.eval.zeroshot import ZeroShotClassification
from contrastive.models import build_model, build_tokenizer
from tests.conftest import run, tiny_run_overrides


@pytest.fixture(scope="module")
def checkpoint_run(demo_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("eval_run") / "run"
    result = run([sys.executable, "-m", "contrastive.cli.train", *tiny_run_overrides(demo_root, run_dir),
                  "trainer.max_steps=6", "trainer.checkpoint_every=3"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _model_and_tokenizer(checkpoint: Path):
    """The trained model and its tokenizer straight from the checkpoint file (torch.load, the run's own config),
    not through the loading API the CLI uses."""
    if checkpoint.is_dir():
        checkpoint = sorted((checkpoint / "checkpoints").glob("step_*.pt"))[-1]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), state["config"]["model"]))
    model = build_model(model_cfg)
    model.load_state_dict(state["model"])
    return model.eval(), build_tokenizer(model_cfg)


def _straightforward_acc1(model, tokenizer, root: Path) -> float:
    """Plain loops: tar members -> PIL -> resize/crop/normalise -> cosine similarity with per-class prompt means."""
    classnames = (root / "classnames.txt").read_text().split("\n")
    classnames = [c.strip() for c in classnames if c.strip()]
    templates = [t.strip() for t in (root / "zeroshot_classification_templates.txt").read_text().splitlines()
                 if t.strip()]
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    transform = v2.Compose([v2.PILToTensor(),
                            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
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
    # Each checkpoint's accuracy, in its JSON and in the table, is the one plain loops compute from its weights.
    for step, path, row in zip(steps, results, rows):
        model, tokenizer = _model_and_tokenizer(step)
        expected = _straightforward_acc1(model, tokenizer, demo_root)
        assert json.loads(path.read_text())["metrics"]["acc1"] == pytest.approx(expected, abs=1e-6)
        assert float(row["acc1"]) == pytest.approx(expected, abs=1e-6)


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
    assert evaluators[1].run(load_encoder(checkpoint_run), torch.device("cpu")) == pytest.approx(record["metrics"],
                                                                                                 abs=1e-6)


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


def _shard_samples(root: Path, split: str):
    """(key, png bytes, label) of every sample of ROOT/SPLIT/*.tar, read with tarfile."""
    for shard in sorted((root / split).glob("*.tar"), key=lambda p: int(p.stem)):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = archive.extractfile(member).read()
        for key, sample in members.items():
            yield key, sample["png"], int(sample["cls"])


def test_zeroshot_cli_on_an_image_folder_matches_plain_loops_over_the_same_images(checkpoint_run, demo_root, tmp_path):
    folder = tmp_path / "folder"
    for key, data, label in _shard_samples(demo_root, "test"):
        (folder / "test" / f"class{label}").mkdir(parents=True, exist_ok=True)  # sorted order = label order (0-9)
        (folder / "test" / f"class{label}" / f"{key}.png").write_bytes(data)
    out = tmp_path / "folder.json"
    assert eval_main(["zeroshot", "--checkpoint", str(checkpoint_run), "--dataset-root", str(folder),
                      "--classnames", str(demo_root / "classnames.txt"),
                      "--templates", str(demo_root / "zeroshot_classification_templates.txt"),
                      "--output", str(out), "--workers", "0", "--no-progress"]) == 0
    model, tokenizer = _model_and_tokenizer(checkpoint_run)
    expected = _straightforward_acc1(model, tokenizer, demo_root)  # the same PNG bytes, from the shards
    assert json.loads(out.read_text())["metrics"]["acc1"] == pytest.approx(expected, abs=1e-6)


def _plain_features(model, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.cfg.vision["image_size"] if isinstance(model.cfg.vision, dict) else model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    transform = v2.Compose([v2.PILToTensor(),
                            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(model.cfg.image_mean, model.cfg.image_std)])
    images, labels = [], []
    for _, data, label in _shard_samples(root, split):
        images.append(transform(Image.open(io.BytesIO(data)).convert("RGB")))
        labels.append(label)
    with torch.no_grad():
        features = F.normalize(model.clip.encode_image(torch.stack(images)), dim=-1)
    return features, torch.tensor(labels)


def test_probe_cli_beats_a_hand_computed_nearest_class_mean_baseline(checkpoint_run, demo_root, tmp_path):
    out = tmp_path / "probe.json"
    assert eval_main(["probe", "--checkpoint", str(checkpoint_run), "--dataset-root", str(demo_root),
                      "--output", str(out), "--workers", "0", "--no-progress"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    model, _ = _model_and_tokenizer(checkpoint_run)
    train_x, train_y = _plain_features(model, demo_root, "train")
    test_x, test_y = _plain_features(model, demo_root, "test")
    centroids = F.normalize(torch.stack([train_x[train_y == c].mean(0) for c in range(10)]), dim=-1)
    nearest_mean = ((test_x @ centroids.T).argmax(1) == test_y).float().mean().item()
    # A logistic-regression probe with its L2 strength tuned on 51 held-out training images does at least about
    # as well as nearest class mean on the same frozen features (0.05 = 26 of 512 test images of slack), and both
    # are far above chance (0.1) even after 6 steps of training.
    assert nearest_mean > 0.3, nearest_mean
    assert metrics["acc1"] >= nearest_mean - 0.05, (metrics, nearest_mean)
    assert 0 <= metrics["acc1"] <= metrics["acc5"] <= 1


def _small_eval_root(demo_root: Path, root: Path, shards: int = 2) -> Path:
    """The demo test split cut to its first shards (32 samples each), with its class names and templates."""
    (root / "test").mkdir(parents=True)
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (root / name).write_bytes((demo_root / name).read_bytes())
    for index in range(shards):
        (root / "test" / f"{index}.tar").write_bytes((demo_root / "test" / f"{index}.tar").read_bytes())
    return root


@pytest.mark.slow
def test_evaluation_during_training_logs_the_checkpoints_accuracy_at_every_eval_step(demo_root, tmp_path):
    run_dir = tmp_path / "run"
    eval_root = _small_eval_root(demo_root, tmp_path / "eval")
    result = run([sys.executable, "-m", "contrastive.cli.train", *tiny_run_overrides(demo_root, run_dir),
                  "trainer.max_steps=5", "trainer.checkpoint_every=2", "trainer.keep_last_checkpoints=10",
                  "eval.every_steps=2", "eval.at_end=true", "eval.batch_size=256",
                  f"eval.zeroshot=[{{name:fm,root:'{eval_root}'}}]"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {row["step"]: row["eval/fm/acc1"] for row in rows if "eval/fm/acc1" in row}
    assert sorted(logged) == [2, 4, 5]  # every 2 steps, and at the end
    checkpoints = {int(p.stem.split("_")[-1]): p for p in (run_dir / "checkpoints").glob("*.pt")}
    for step, acc1 in logged.items():
        model, tokenizer = _model_and_tokenizer(checkpoints[step])
        assert acc1 == pytest.approx(_straightforward_acc1(model, tokenizer, eval_root), abs=1e-6), step
