"""Distillation's mechanisms: teachers from every format the encoder-loading API reads (frozen, hashed, in their own
preprocessing), the teacher view of the student's augmentation, the refused resume with another teacher,
reinforced data sets (written, valid, resumed, replayed to the stored embedding), and the two demo recipes on two
ranks. The losses: tests/test_distillation_losses.py."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as v1
from torchvision.transforms.v2 import functional

from contrastive.checkpoint_io import checkpoint_path
from contrastive.cli.data import main as data_main
from contrastive.config import DistillationConfig, TeacherConfig
from contrastive.data.loader import build_train_loader
from contrastive.data.reinforced import from_npy, normalized_rows, read_sample_files
from contrastive.data.transforms import RandomCropFlip, TeacherViewCrops
from contrastive.dist import init_distributed
from contrastive.encoders import load_encoder, preprocess_from_config, weights_hash
from contrastive.errors import ConfigError, InputError
from contrastive.export import EXPORT_FORMATS
from contrastive.models.tokenizer import build_tokenizer
from contrastive.train.checkpoint import save_checkpoint
from contrastive.train.teachers import Teachers
from contrastive.train.trainer import Trainer
from contrastive.types import Batch
from tests.conftest import compose_config, tiny_run_overrides, torchrun
from tests.data_factory import jpeg, write_tar
from tests.export_models import randomized, tiny_config

TEACHER_SIZE = 35  # the students' test_tiny takes 28 x 28 in 4 x 4 patches; the teacher 35 x 35 in 5 x 5


def _teacher_config(**changes):
    return tiny_config(vision={"image_size": TEACHER_SIZE, "patch_size": 7}, image_mean=[0.4, 0.45, 0.5],
                       image_std=[0.2, 0.25, 0.3], **changes)


def _save_ours(model, cfg, directory):
    save_checkpoint({"model": model.state_dict(), "config": {"name": "teacher", "model": dataclasses.asdict(cfg)},
                     "step": 1}, checkpoint_path(directory, 1), keep_last=2)
    return directory


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """The same random teacher as a run directory of ours, an open_clip directory and a transformers export, and
    another teacher (other weights) as a run directory."""
    root = tmp_path_factory.mktemp("teachers")
    cfg = _teacher_config()
    model = randomized(cfg, seed=3)
    paths = {"ours": _save_ours(model, cfg, root / "ours"), "open_clip": root / "open_clip",
             "transformers": root / "transformers"}
    for kind in ("open_clip", "transformers"):
        paths[kind].mkdir()
        EXPORT_FORMATS.get(kind)(model, paths[kind])
    paths["other"] = _save_ours(randomized(cfg, seed=4), cfg, root / "other")
    return paths


@pytest.fixture(scope="module")
def reinforced(teachers, demo_root, tmp_path_factory):
    """Two demo shards reinforced with the 'ours' teacher: 3 augmentations each, float32 (for the replay test)."""
    out = tmp_path_factory.mktemp("reinforced") / "set"
    code = data_main(["reinforce", f"{demo_root / 'train'}/{{0..1}}.tar", "--teacher", f"demo={teachers['ours']}",
                      "--out", str(out), "--augmentations", "3", "--crop-scale", "0.5", "1.0", "--horizontal-flip",
                      "--dtype", "float32", "--device", "cpu"])
    assert code == 0
    return out


@pytest.mark.parametrize("kind", ["ours", "open_clip", "transformers"])
def test_teachers_load_from_every_format_frozen_hashed_in_their_own_preprocessing(teachers, kind):
    env = init_distributed("cpu")
    image_only = kind == "transformers"  # an image-only export: feature terms only
    cfg = DistillationConfig(teachers=[TeacherConfig(name=kind, path=str(teachers[kind]))],
                             feature_weight=1.0, contrastive_weight=0.0 if image_only else 1.0)
    loaded = Teachers(cfg, env, "ddp")
    reference = load_encoder(teachers[kind])
    assert loaded.hashes == {kind: weights_hash(reference.model)}
    encoder = loaded.teachers[0].encoder
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert loaded.view == (TEACHER_SIZE, reference.preprocess.interpolation)
    pixels = torch.randint(0, 256, (3, 3, TEACHER_SIZE, TEACHER_SIZE), dtype=torch.uint8)
    captions = ["a shirt", "a boot", "a bag"]
    targets = loaded.targets(Batch(images=torch.empty(3, 0), tokens=torch.empty(3, 0), teacher_images=pixels,
                                   captions=captions))[kind]
    with torch.no_grad():
        normalised = functional.normalize(pixels.float() / 255, [0.4, 0.45, 0.5], [0.2, 0.25, 0.3])
        torch.testing.assert_close(targets.image_features, reference.model.encode_image(normalised))
        if not image_only:
            torch.testing.assert_close(targets.text_features,
                                       reference.model.encode_text(reference.tokenizer(captions)))
            assert targets.logit_scale.item() == pytest.approx(reference.logit_scale)
    if image_only:
        with pytest.raises(ConfigError, match="no text tower"):
            Teachers(dataclasses.replace(cfg, contrastive_weight=1.0), env, "ddp")


def test_teacher_view_is_the_student_augmentation_at_the_teacher_resolution():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    student = RandomCropFlip(28, "bicubic", (0.3, 1.0), horizontal_flip=True)
    for seed in range(6):
        student_view, teacher_view = TeacherViewCrops(student, TEACHER_SIZE, "bilinear")(
            image, torch.Generator().manual_seed(seed))
        # torchvision's draws from the global generator seeded alike: the box, then the flip
        torch.manual_seed(seed)
        box = v1.RandomResizedCrop.get_params(image, (0.3, 1.0), (3 / 4, 4 / 3))
        flip = torch.rand(1).item() < 0.5
        pixels = functional.pil_to_tensor(image)
        for view, size, mode in ((student_view, 28, "bicubic"), (teacher_view, TEACHER_SIZE, "bilinear")):
            expected = functional.resized_crop(pixels, *box, [size, size], interpolation=getattr(
                v1.InterpolationMode, mode.upper()), antialias=True)
            torch.testing.assert_close(view, functional.horizontal_flip(expected) if flip else expected)


def _distill_overrides(demo_root, run_dir, teacher, extra=()):
    return [*tiny_run_overrides(demo_root, run_dir), f"+loss.distillation.teachers=[{{name: t, path: {teacher}}}]",
            "loss.distillation.contrastive_weight=1", "loss.distillation.feature_weight=0.5",
            "loss.distillation.patch_weight=0.5", "trainer.max_steps=2", *extra]


def test_online_distillation_trains_and_resume_refuses_another_teacher(demo_root, teachers, tmp_path):
    run_dir = tmp_path / "run"
    cfg = OmegaConf.to_object(compose_config(_distill_overrides(demo_root, run_dir, teachers["ours"])))
    Trainer(cfg).train()
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    # the teacher's 5 x 5 patch grid and the student's 4 x 4 met through interpolation
    assert {"distill/t/contrastive", "distill/t/feature", "distill/t/patch"} <= set(last)
    resumed = _distill_overrides(demo_root, run_dir, teachers["open_clip"], ["resume=latest", "trainer.max_steps=3"])
    Trainer(OmegaConf.to_object(compose_config(resumed)))  # the same weights in another format: the same hash
    other = _distill_overrides(demo_root, run_dir, teachers["other"], ["resume=latest", "trainer.max_steps=3"])
    with pytest.raises(ConfigError, match="resume refused: the checkpoint was trained with teachers"):
        Trainer(OmegaConf.to_object(compose_config(other)))


def test_training_from_a_reinforced_set_refuses_other_teacher_weights_before_training(reinforced, teachers,
                                                                                       demo_root, tmp_path):
    """The set's reinforce.json names the weights hash of each teacher; the configured teacher must match it."""
    def trainer_for(teacher, shards):
        overrides = [*tiny_run_overrides(demo_root, tmp_path / "run"),
                     f"+loss.distillation.teachers=[{{name: demo, path: {teacher}}}]",
                     "loss.distillation.reinforced=true", "loss.distillation.contrastive_weight=1",
                     f"data.sources.0.shards={shards}", "data.resampled=true", "trainer.max_steps=1"]
        return Trainer(OmegaConf.to_object(compose_config(overrides)))

    trainer_for(teachers["open_clip"], reinforced)  # the same weights in another format: accepted
    with pytest.raises(ConfigError, match=r"was written with teacher 'demo' sha256 \w+, and loss.distillation"):
        trainer_for(teachers["other"], reinforced)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for shard in reinforced.glob("*.tar"):
        (unfinished / shard.name).write_bytes(shard.read_bytes())
    with pytest.raises(ConfigError, match="no .*reinforce.json; contrastive-data reinforce writes it once"):
        trainer_for(teachers["ours"], unfinished)


def _members(path):
    with tarfile.open(path) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive.getmembers()}


def test_reinforced_set_is_valid_resumes_and_replays_to_the_stored_embedding(reinforced, teachers, demo_root,
                                                                            capsys):
    manifest = json.loads((reinforced / "reinforce.json").read_text())
    inputs = sum((demo_root / "train" / f"{i}.tar").stat().st_size for i in range(2))
    outputs = sum((reinforced / f"{i}.tar").stat().st_size for i in range(2))
    assert manifest["size_overhead"] == pytest.approx(outputs / inputs - 1)
    assert manifest["teachers"]["demo"]["sha256"] == weights_hash(load_encoder(teachers["ours"]).model)
    assert data_main(["validate", str(reinforced)]) == 0
    # a killed run left shard 1 unwritten and a partial file: the rerun writes shard 1 alone, the same bytes
    before = {i: (reinforced / f"{i}.tar").read_bytes() for i in range(2)}
    written_at = (reinforced / "0.tar").stat().st_mtime_ns
    (reinforced / "1.tar").unlink()
    (reinforced / ".1.tar.999.tmp").write_bytes(b"partial")
    assert data_main(["reinforce", f"{demo_root / 'train'}/{{0..1}}.tar", "--teacher", f"demo={teachers['ours']}",
                      "--out", str(reinforced), "--augmentations", "3", "--crop-scale", "0.5", "1.0",
                      "--horizontal-flip", "--dtype", "float32", "--device", "cpu"]) == 0
    assert "wrote 1 shards (64 samples), 1 already done" in capsys.readouterr().out
    assert (reinforced / "0.tar").stat().st_mtime_ns == written_at
    assert {i: (reinforced / f"{i}.tar").read_bytes() for i in range(2)} == before
    # replay: each stored augmentation, cut by torchvision from the original image, gives the stored embedding
    teacher = load_encoder(teachers["ours"])
    members = _members(reinforced / "0.tar")
    for key in sorted({name.split(".")[0] for name in members})[:4]:
        record = np.load(io.BytesIO(members[f"{key}.distill.npy"]))
        pixels = functional.pil_to_tensor(Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB"))
        assert record["source_size"].tolist() == list(pixels.shape[-2:])
        assert len(record["boxes"]) == len(record["flips"]) == len(record["demo.image"]) == 3
        assert record["demo.logit_scale"] == teacher.logit_scale
        _assert_replayed(teacher, pixels, record["boxes"], record["flips"], record["demo.image"])


def _assert_replayed(teacher, pixels, boxes, flips, embeddings):
    """Each stored box and flip, cut by torchvision from `pixels` (as decoded), through the teacher gives the
    stored embedding (1e-5)."""
    for (top, left, height, width), flip, embedding in zip(boxes.tolist(), flips.tolist(), embeddings):
        view = functional.resized_crop(pixels, top, left, height, width, [TEACHER_SIZE, TEACHER_SIZE],
                                       interpolation=v1.InterpolationMode.BICUBIC, antialias=True)
        view = functional.horizontal_flip(view) if flip else view
        normalised = functional.normalize(view.float()[None] / 255, [0.4, 0.45, 0.5], [0.2, 0.25, 0.3])
        with torch.no_grad():
            replayed = teacher.model.encode_image(normalised)[0]
        torch.testing.assert_close(torch.from_numpy(embedding.astype(np.float32)), replayed, atol=1e-5, rtol=0)


def _draft_decoded(data: bytes, boxes, side: int) -> torch.Tensor:
    """PIL's own draft decoding, asked for the shorter side at which every box keeps `side` pixels across."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    request = math.ceil(side * max(max(height / h, width / w) for _, _, h, w in boxes))
    image.draft("RGB", (request, request))
    return functional.pil_to_tensor(image.convert("RGB"))


def _scaled(box, source, decoded):
    """A box in source pixels on the draft-decoded image: each edge scaled and rounded."""
    (top, left, height, width), (source_height, source_width), (decoded_height, decoded_width) = box, source, decoded
    top_, bottom = round(top * decoded_height / source_height), round((top + height) * decoded_height / source_height)
    left_, right = round(left * decoded_width / source_width), round((left + width) * decoded_width / source_width)
    return top_, left_, bottom - top_, right - left_


def test_reinforced_jpegs_stay_draft_decoded_and_replay_to_the_stored_embedding(teachers, tmp_path):
    """Large JPEGs: boxes are stored in the JPEG's own pixels; reinforce and the training stream both decode at a
    reduced DCT scale (asserted: 1000 x 750 decodes at 1/8) and scale the boxes to it. Replaying each stored box on
    PIL's draft decode gives the stored teacher embedding (1e-5), and the stream's student crop equals torchvision's
    crop of the scaled box on the draft decode at the student's size."""
    source = (750, 1000)
    samples = [(f"big{i}", {"jpg": jpeg(source[::-1], seed=i), "txt": f"a large photo {i}".encode()})
               for i in range(4)]
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "0.tar", samples)
    out = tmp_path / "out"
    assert data_main(["reinforce", str(tmp_path / "in" / "0.tar"), "--teacher", f"demo={teachers['ours']}",
                      "--out", str(out), "--augmentations", "2", "--crop-scale", "0.5", "1.0", "--horizontal-flip",
                      "--dtype", "float32", "--device", "cpu"]) == 0
    teacher, members = load_encoder(teachers["ours"]), _members(out / "0.tar")
    records = {key: np.load(io.BytesIO(members[f"{key}.distill.npy"])) for key, _ in samples}
    for key, files in samples:
        record = records[key]
        assert record["source_size"].tolist() == list(source)
        pixels = _draft_decoded(files["jpg"], record["boxes"].tolist(), TEACHER_SIZE)
        assert pixels.shape[-2:] == (math.ceil(source[0] / 8), math.ceil(source[1] / 8))  # 1/8 scale
        boxes = np.array([_scaled(box, source, pixels.shape[-2:]) for box in record["boxes"].tolist()])
        _assert_replayed(teacher, pixels, boxes, record["flips"], record["demo.image"])
    cfg = compose_config(["model=test_tiny", "debug=tiny", f"data.sources.0.shards={out / '0.tar'}",
                          "data.batch_size=4"])
    preprocess = preprocess_from_config(cfg.model)
    batch = next(iter(build_train_loader(cfg.data, preprocess, build_tokenizer(cfg.model), rank=0, world_size=1,
                                         seed=0, reinforced=("demo",))))
    for index, key in enumerate(batch.keys):
        record, data = records[key], dict(samples)[key]["jpg"]
        stored = torch.nn.functional.normalize(torch.from_numpy(record["demo.image"]), dim=-1)
        choice = int((stored @ batch.teachers["demo"].image_features[index]).argmax())
        # the stored rows reach the batch as unit vectors, the text row and the teacher's temperature with them
        torch.testing.assert_close(batch.teachers["demo"].image_features[index], stored[choice])
        torch.testing.assert_close(batch.teachers["demo"].text_features[index],
                                   torch.nn.functional.normalize(torch.from_numpy(record["demo.text"]), dim=-1))
        assert batch.teachers["demo"].logit_scale.item() == pytest.approx(teacher.logit_scale)
        box, flip = record["boxes"][choice].tolist(), bool(record["flips"][choice])
        pixels = _draft_decoded(data, [box], preprocess.image_size)
        assert pixels.shape[-1] <= source[1] // 4
        expected = functional.resized_crop(pixels, *_scaled(box, source, pixels.shape[-2:]),
                                           [preprocess.image_size] * 2, interpolation=v1.InterpolationMode.BICUBIC,
                                           antialias=True)
        torch.testing.assert_close(batch.images[index], functional.horizontal_flip(expected) if flip else expected,
                                   atol=0, rtol=0)


@pytest.mark.distributed
@pytest.mark.parametrize("recipe", ["demo_distill", "demo_distill_reinforced"])
def test_demo_distillation_recipes_run_on_two_ranks(recipe, demo_root, teachers, reinforced, tmp_path):
    """Online: the student under FSDP2 and the teacher sharded with it. Reinforced: the stored embeddings, no
    teacher forward; the student's CLIP loss and the distillation terms are logged."""
    run_dir = tmp_path / "run"
    overrides = [f"experiment={recipe}", *tiny_run_overrides(demo_root, run_dir),
                 f"loss.distillation.teachers.0.path={teachers['ours']}", "data.batch_size=32", "trainer.max_steps=3",
                 "data.num_workers=1", "data.resampled=true"]
    if recipe == "demo_distill":
        overrides.append("dist.strategy=fsdp")
    else:
        overrides.append(f"data.sources.0.shards={reinforced}")
    torchrun(["-m", "contrastive.cli.train", *overrides], nproc=2)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3
    assert {"contrastive_loss", "distill/demo/contrastive", "distill/demo/feature"} <= set(rows[-1])
    assert all(np.isfinite(row["loss"]) for row in rows if "loss" in row)


@pytest.mark.distributed
def test_teachers_sharded_under_fsdp2_and_in_bf16_give_the_unsharded_embeddings(teachers):
    """On 2 ranks: the FSDP2-sharded teacher holds about half of its weights per rank and gives the unsharded fp32
    teacher's embeddings (1e-5); in bf16 (sharded and not) within bf16 precision, and not bit for bit."""
    result = torchrun(["tests/dist_scripts/sharded_teacher.py", str(teachers["ours"])], nproc=2)
    assert result.stdout.count("sharded teacher ") == 3, result.stdout


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_stored_embeddings_read_as_numpy_writes_them_and_normalise_to_unit_rows(dtype):
    """The reinforced reader's .npy parsing (a cached header, the values viewed in place) gives what np.load gives,
    refuses corrupt bytes with a ValueError (a counted bad sample upstream), and the batch's stored rows come out as
    the float64 unit vectors of the stored values, to float32 precision."""
    rows = np.random.default_rng(0).normal(size=(5, 12)).astype(dtype)
    for array in (rows, rows[0], rows.reshape(5, 3, 4)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        parsed = from_npy(buffer.getvalue())
        assert parsed.dtype == array.dtype and parsed.shape == array.shape
        np.testing.assert_array_equal(parsed, array)
    for corrupt in (buffer.getvalue()[:-4], b"not an npy file at all", b""):
        with pytest.raises(ValueError):
            from_npy(corrupt)
    expected = rows.astype(np.float64) / np.linalg.norm(rows.astype(np.float64), axis=1, keepdims=True)
    torch.testing.assert_close(normalized_rows(list(rows)), torch.from_numpy(expected).float(), atol=1e-7, rtol=0)
    # a sample of the format before the one-record layout (boxes in full-resolution pixels) is refused in one line
    with pytest.raises(InputError, match="older contrastive-data reinforce.*write the set again"):
        read_sample_files({"__url__": "old/0.tar", "distill.json": b"{}", "demo.img.npy": buffer.getvalue()},
                          ("demo",))
