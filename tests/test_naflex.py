"""NaFlex (issue 17): the patch grid against transformers' Siglip2ImageProcessor, the per-step sequence length on
every rank and across a resume, bad-data counting, and the NaFlex tower's padding invariance."""

from __future__ import annotations

import json
import random
import sys

import numpy
import pytest
import torch
import transformers
from PIL import Image
from torch.utils.data import DataLoader
from transformers.models.siglip2.image_processing_siglip2 import (
    Siglip2ImageProcessor,
    get_image_size_for_max_num_patches,
)

from contrastive.cli.eval import main as eval_main
from contrastive.cli.export import main as export_main
from contrastive.config import LossConfig, validate
from contrastive.connectors import AttentionPooler, PatchMerger
from contrastive.data.loader import build_train_loader
from contrastive.data.naflex import NaFlexResize, PatchNormalize, grid_for_max_patches, naflex_batch, pack
from contrastive.data.stream import ImageTextStream, NaFlexSchedule, Source, StreamLayout
from contrastive.dist.collectives import LocalCollectives
from contrastive.encoders import load_encoder, preprocess_from_config
from contrastive.encoders.encoder import LoadedEncoder
from contrastive.encoders.naflex import at_seq_len
from contrastive.errors import ConfigError
from contrastive.export import load_vision_encoder
from contrastive.losses import build_loss, list_losses
from contrastive.models import build_model, build_tokenizer, list_models
from contrastive.models.naflex import encode_naflex, naflex_trunk_tokens
from contrastive.train.step import FeatureCache, build_forward_backward
from contrastive.types import Batch
from tests.conftest import compose_config, run, torchrun
from tests.data_factory import jpeg, write_tar
from tests.test_accumulation import assert_same_gradients, gradients

SEQ_LENS = [16, 36, 64]


def _random_photo(height: int, width: int, seed: int) -> Image.Image:
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def naflex_shards(tmp_path_factory):
    """Four shards of 20 JPEGs each, of random sizes from 10 to 90 pixels a side (every aspect from 1:9 to 9:1)."""
    root = tmp_path_factory.mktemp("naflex_shards")
    rng = random.Random(0)
    for shard in range(4):
        write_tar(root / f"{shard}.tar", [
            (f"s{shard}_{index:03d}", {"jpg": jpeg((rng.randint(10, 90), rng.randint(10, 90)), index),
                                      "txt": f"item {index}".encode()})
            for index in range(20)])
    return root


@pytest.fixture(scope="module")
def naflex_cfg(naflex_shards):
    return compose_config(["model=tiny_naflex_siglip", "debug=tiny", f"data.sources.0.shards={naflex_shards}",
                           f"data.naflex_seq_lens=[{','.join(map(str, SEQ_LENS))}]", "data.batch_size=8"])


def test_the_grid_is_the_one_siglip2_image_processor_chooses_on_200_random_sizes():
    rng = random.Random(17)
    for _ in range(200):
        height, width = rng.randint(1, 4000), rng.randint(1, 4000)
        patch, max_patches = rng.choice([7, 14, 16]), rng.choice([16, 64, 128, 256, 576, 784, 1024])
        rows, columns = grid_for_max_patches(height, width, patch, max_patches)
        assert (rows * patch, columns * patch) == get_image_size_for_max_num_patches(height, width, patch,
                                                                                        max_patches)
        assert rows * columns <= max_patches


@pytest.mark.parametrize("size", [(28, 28), (17, 83), (90, 31), (300, 200)])
def test_our_patches_mask_and_grid_equal_siglip2_image_processor_output(size):
    processor = Siglip2ImageProcessor(patch_size=7, max_num_patches=64, resample=2, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3)
    photo = _random_photo(*size, seed=size[0])
    theirs = processor(images=photo, return_tensors="pt")
    image = NaFlexResize(7, "bilinear")(photo, max_patches=64)
    packed = pack([image], 64)
    patches = PatchNormalize([0.5] * 3, [0.5] * 3, 7)(packed.patches, packed.valid)
    assert tuple(theirs["spatial_shapes"][0].tolist()) == image.grid
    assert torch.equal(theirs["pixel_attention_mask"][0].bool(), packed.valid[0])
    torch.testing.assert_close(patches, theirs["pixel_values"], atol=1e-6, rtol=0)


def _naflex_stream(shards, tokenizer, *, num_workers, start_step=0, positions=None, max_skip_fraction=1.0,
                   shuffle_buffer=20):
    layout = StreamLayout(rank=0, world_size=1, num_workers=num_workers, seed=3, resampled=True,
                          shuffle_buffer=shuffle_buffer)
    return ImageTextStream([Source("naflex", shards, 1.0)], layout, NaFlexResize(7, "bilinear", True),
                           tokenizer, None, 8, decode_size=80,
                           start_step=start_step, positions=positions, max_skip_fraction=max_skip_fraction,
                           naflex=NaFlexSchedule(SEQ_LENS), patch_normalize=PatchNormalize([0.5] * 3, [0.5] * 3, 7))


def _batches(stream, count, num_workers):
    iterator = iter(DataLoader(stream, batch_size=None, num_workers=num_workers))
    return [next(iterator) for _ in range(count)]


def test_a_resumed_naflex_stream_repeats_lengths_patches_and_positions(naflex_shards, naflex_cfg):
    shards = [str(naflex_shards / f"{shard}.tar") for shard in range(4)]
    tokenizer = build_tokenizer(naflex_cfg.model)
    straight = _batches(_naflex_stream(shards, tokenizer, num_workers=2), 9, 2)
    assert len({batch.images.shape[1] for batch in straight}) > 1, "the sequence length varies by step"
    k = 5
    positions = {batch.stream_position.worker: batch.stream_position for batch in straight[:k]}
    resumed = _batches(_naflex_stream(shards, tokenizer, num_workers=2, start_step=k, positions=positions), 4, 2)
    for ours, reference in zip(resumed, straight[k:]):
        assert ours.keys == reference.keys
        assert torch.equal(ours.images, reference.images) and torch.equal(ours.patch_coord, reference.patch_coord)
        assert torch.equal(ours.patch_valid, reference.patch_valid)
    for batch in straight:  # every image holds the largest grid that fits the step's length, padding is zero
        counts = batch.patch_valid.sum(1)
        assert (counts <= batch.images.shape[1]).all() and (batch.images[~batch.patch_valid] == 0).all()
        rows, columns = batch.patch_coord.amax(1).unbind(-1)
        assert torch.equal((rows + 1) * (columns + 1), counts)


def test_bad_samples_in_a_naflex_stream_are_skipped_and_counted(tmp_path, naflex_cfg):
    good = [(f"g{index:03d}", {"jpg": jpeg((20 + index, 40), index), "txt": b"fine"}) for index in range(16)]
    bad = [("corrupt", {"jpg": b"not a jpeg", "txt": b"x"}), ("nocaption", {"jpg": jpeg((30, 30))})]
    shard = write_tar(tmp_path / "0.tar", good[:10] + bad + good[10:])
    stream = _naflex_stream([str(shard)], build_tokenizer(naflex_cfg.model), num_workers=1, shuffle_buffer=0)
    batches = _batches(stream, 2, 0)  # the 16 good samples, read in order
    assert batches[-1].stream_position.skipped == {"corrupt_image": 1, "missing_caption": 1}
    assert not {"corrupt", "nocaption"} & {key for batch in batches for key in batch.keys}


def test_every_rank_uses_the_same_sequence_length_each_step(naflex_shards, naflex_cfg, tmp_path):
    out = tmp_path / "lengths.json"
    steps = 8
    torchrun(["tests/dist_scripts/naflex_seq_lens.py", str(naflex_shards), str(steps), str(out)], nproc=2)
    ranks = json.loads(out.read_text())
    assert ranks[0]["lengths"] == ranks[1]["lengths"] and len(set(ranks[0]["lengths"])) > 1
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"]), "the ranks read different samples"
    assert all(largest <= length for rank in ranks for largest, length in zip(rank["largest"], rank["lengths"]))
    # A one-process loader with no DataLoader workers gives each step the same length as well.
    loader = build_train_loader(naflex_cfg.data, preprocess_from_config(naflex_cfg.model),
                                build_tokenizer(naflex_cfg.model), rank=0, world_size=1, seed=naflex_cfg.seed)
    iterator = iter(loader)
    assert [next(iterator).images.shape[1] for _ in range(steps)] == ranks[0]["lengths"]


def test_the_naflex_tower_ignores_padding_and_equals_its_fixed_resolution_forward(naflex_cfg):
    torch.manual_seed(0)
    model = build_model(naflex_cfg.model).eval()
    visual = model.clip.visual
    resize, normalize = NaFlexResize(7, "bilinear"), PatchNormalize([0.5] * 3, [0.5] * 3, 7)
    wide, square = _random_photo(20, 60, seed=1), _random_photo(28, 28, seed=2)

    def features(images, seq_len):
        packed = pack(images, seq_len)
        return encode_naflex(visual, normalize(packed.patches, packed.valid), packed.coord, packed.valid)

    wide_grid = resize(wide, max_patches=27)
    assert wide_grid.grid == (3, 9)
    with torch.no_grad():
        alone = features([wide_grid], 27)[0]  # no padding
        beside = features([wide_grid, resize(square, max_patches=64)], 64)[0]  # 37 padding patches, another image
        torch.testing.assert_close(beside, alone, atol=1e-5, rtol=0)
        # A 28 x 28 image at 16 patches is the tower's own 4 x 4 grid: the NaFlex path equals the image path.
        pixels = (torch.from_numpy(numpy.asarray(square)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        fixed = visual(pixels[None])[0]
        torch.testing.assert_close(features([resize(square, max_patches=16)], 16)[0], fixed, atol=1e-5, rtol=0)


def test_naflex_lengths_need_a_naflex_tower():
    with pytest.raises(ConfigError, match="naflexvit_"):
        cfg = compose_config(["model=tiny_siglip", "data.naflex_seq_lens=[16]"])
        validate(cfg, model_archs=list_models(), loss_names=list_losses())


def test_naflex_lengths_refuse_distillation_teachers():
    # Teachers are fed a crop of each student augmentation; NaFlex batches carry patches instead.
    overrides = ["model=tiny_naflex_siglip", "data.naflex_seq_lens=[16]", "loss=siglip",
                 "loss.distillation.teachers=[{name: t, path: runs/demo}]", "loss.distillation.sigmoid_weight=1"]
    validate(compose_config(overrides[:3]), model_archs=list_models(), loss_names=list_losses())  # alone: valid
    with pytest.raises(ConfigError, match="does not combine with data.naflex_seq_lens"):
        validate(compose_config(overrides), model_archs=list_models(), loss_names=list_losses())


@pytest.fixture(scope="module")
def naflex_run(naflex_shards, tmp_path_factory):
    """A NaFlex SigLIP trained 4 steps of 16 at lengths 16/36/64 on the variable-aspect shards, one process."""
    run_dir = tmp_path_factory.mktemp("naflex_run") / "run"
    result = run([sys.executable, "-m", "contrastive.cli.train", "model=tiny_naflex_siglip", "loss=siglip",
                  "debug=tiny", f"data.sources.0.shards={naflex_shards}",
                  f"data.naflex_seq_lens=[{','.join(map(str, SEQ_LENS))}]", f"run_dir={run_dir}",
                  "trainer.threads_per_process=1"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def naflex_export(naflex_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("naflex_export")
    for kind in ("transformers", "bundle"):
        assert export_main(["--checkpoint", str(naflex_run), "--format", kind, "--out", str(out / kind)]) == 0
    return out


def test_a_naflex_checkpoint_exports_a_siglip2_vision_model_equal_to_our_pipeline_and_tower(naflex_run,
                                                                                             naflex_export):
    hf_dir = naflex_export / "transformers"
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["Siglip2VisionModel"]
    model = transformers.AutoModel.from_pretrained(hf_dir, local_files_only=True).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(hf_dir, local_files_only=True)
    assert type(model) is transformers.Siglip2VisionModel and type(processor).__name__ == "Siglip2ImageProcessor"
    ours = load_vision_encoder(naflex_export / "bundle")  # penultimate block by default
    last = load_vision_encoder(naflex_export / "bundle", feature_layer=-1)
    trained = load_encoder(naflex_run).model.clip.visual
    # Wide, tall and square-ish photos, each at a length where its grid is not the position table's 4 x 4.
    for size, max_patches in (((20, 70), 36), ((90, 25), 64), ((50, 45), 36)):
        photo = _random_photo(*size, seed=max_patches)
        with torch.no_grad():
            theirs = model(**processor(images=photo, max_num_patches=max_patches, return_tensors="pt"),
                           output_hidden_states=True)
            batch = naflex_batch([photo], ours.preprocess, max_patches)
            penultimate = ours.forward_naflex(batch.patches, batch.coord, batch.valid)
            final = last.forward_naflex(batch.patches, batch.coord, batch.valid)
            features = encode_naflex(trained, batch.patches, batch.coord, batch.valid)
        valid = batch.valid[0]
        rows, columns = penultimate.patch_tokens[0].shape[:2]
        assert rows * columns == int(valid.sum()) and (rows, columns) != (4, 4)
        close = {"atol": 1e-5, "rtol": 1e-5}
        torch.testing.assert_close(penultimate.patch_tokens[0].reshape(rows * columns, -1),
                                   theirs.hidden_states[-2][0][valid], **close)
        # The last block's output; Siglip2VisionModel's last_hidden_state is it after the final LayerNorm.
        torch.testing.assert_close(final.patch_tokens[0].reshape(rows * columns, -1),
                                   theirs.hidden_states[-1][0][valid], **close)
        torch.testing.assert_close(naflex_trunk_tokens(trained, batch.patches, batch.coord, batch.valid)[0][valid],
                                   theirs.last_hidden_state[0][valid], **close)
        torch.testing.assert_close(penultimate.pooled, theirs.pooler_output, **close)
        torch.testing.assert_close(features, theirs.pooler_output, **close)


def test_eval_at_several_sequence_lengths_records_each_and_matches_fixed_resolution_on_its_own_grid(
        naflex_run, demo_root, tmp_path):
    common = ["zeroshot", "--checkpoint", str(naflex_run), "--dataset-root", str(demo_root), "--workers", "0",
              "--no-progress"]
    assert eval_main([*common, "--seq-len", "16,36", "--output-dir", str(tmp_path / "naflex")]) == 0
    assert eval_main([*common, "--output", str(tmp_path / "fixed.json")]) == 0
    records = {json.loads(path.read_text())["seq_len"]: json.loads(path.read_text())
               for path in (tmp_path / "naflex").glob("*.json")}
    fixed = json.loads((tmp_path / "fixed.json").read_text())
    assert sorted(records) == [16, 36] and "seq_len" not in fixed
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(records[36])
    # The demo's 28 x 28 images at 16 patches are the tower's own 4 x 4 grid, unresized: the fixed-resolution result.
    assert records[16]["metrics"] == pytest.approx(fixed["metrics"], abs=1e-6)
    assert "seq_len" in (tmp_path / "naflex" / "summary.csv").read_text().splitlines()[0]


def test_eval_at_a_sequence_length_refuses_a_fixed_resolution_checkpoint():
    with pytest.raises(ConfigError, match="--seq-len needs a NaFlex checkpoint"):
        fixed = LoadedEncoder(model=torch.nn.Identity(), preprocess=preprocess_from_config(
            compose_config(["model=tiny_siglip"]).model), tokenizer=None, kind="contrastive", name="m", source="x")
        at_seq_len(fixed, 64)


def test_feature_cache_on_naflex_batches_gives_the_full_batch_gradients(naflex_cfg):
    torch.manual_seed(0)
    model = build_model(naflex_cfg.model)
    resize = NaFlexResize(7, "bilinear")
    photos = [_random_photo(15 + 9 * index, 70 - 7 * index, seed=index) for index in range(8)]
    packed = pack([resize(photo, max_patches=36) for photo in photos], 36)
    tokens = torch.randint(1, 1000, (8, 16), generator=torch.Generator().manual_seed(1))
    tokens[:, 10:] = 0
    batch = Batch(images=PatchNormalize([0.5] * 3, [0.5] * 3, 7)(packed.patches, packed.valid), tokens=tokens,
                  keys=[str(index) for index in range(8)], patch_coord=packed.coord, patch_valid=packed.valid)
    loss = build_loss(LossConfig(name="siglip"))
    full = loss(model(batch.images, batch.tokens, patch_coord=batch.patch_coord, patch_valid=batch.patch_valid),
                batch, LocalCollectives())
    model.zero_grad(set_to_none=True)
    full.loss.backward()
    expected = gradients(model)
    model.zero_grad(set_to_none=True)
    step = build_forward_backward(model, loss, LocalCollectives(), steps=4, randomness=model.randomness)
    assert isinstance(step, FeatureCache)
    result = step(batch)
    assert_same_gradients(gradients(model), expected)
    torch.testing.assert_close(result.loss, full.loss.detach())


def test_naflex_cappa_decodes_from_the_valid_patches_only():
    cfg = compose_config(["model=tiny_naflex_cappa", "loss=cappa"]).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    resize, normalize = NaFlexResize(7, "bilinear"), PatchNormalize([0.5] * 3, [0.5] * 3, 7)
    wide = resize(_random_photo(20, 60, seed=1), max_patches=27)
    tokens = torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(2))

    def logits(images, seq_len, rows):
        packed = pack(images, seq_len)
        patches = normalize(packed.patches, packed.valid)
        out = model(patches, tokens[:rows], patch_coord=packed.coord, patch_valid=packed.valid)
        pooled = model.encode_image(patches, patch_coord=packed.coord, patch_valid=packed.valid)
        return out.caption_logits, pooled

    with torch.no_grad():
        alone, pooled_alone = logits([wide], 27, 1)
        beside, pooled_beside = logits([wide, resize(_random_photo(50, 50, seed=3), max_patches=64)], 64, 2)
        # The padding patches' tokens are set to anything: the decoder and the pooled mean must not read them.
        torch.testing.assert_close(beside[0], alone[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(pooled_beside[0], pooled_alone[0], atol=1e-5, rtol=0)
    loss = build_loss(LossConfig(name="cappa"))
    batch = Batch(images=torch.zeros(1), tokens=tokens[:1])
    model.train()
    packed = pack([wide], 36)
    out = model(normalize(packed.patches, packed.valid), tokens[:1], patch_coord=packed.coord,
                patch_valid=packed.valid)
    loss(out, batch, LocalCollectives()).loss.backward()
    assert model.visual.trunk.embeds.proj.weight.grad.abs().sum() > 0


def test_the_connectors_take_naflex_grids_and_padding():
    merger = PatchMerger(1, 4)
    merger.norm, merger.mlp = torch.nn.Identity(), torch.nn.Identity()  # the output is the merged vector itself
    merged = merger(torch.arange(8.0).reshape(1, 8, 1), grid=(2, 4))[0]  # a 2 x 4 grid, row-major
    assert merged.tolist() == [[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]
    with pytest.raises(ConfigError, match="a 3 x 4 grid"):
        merger(torch.randn(1, 12, 1), grid=(3, 4))
    torch.manual_seed(0)
    pooler = AttentionPooler(8, 16, num_queries=4, num_heads=2).eval()
    tokens = torch.randn(1, 10, 8)
    valid = torch.arange(10)[None] < 6
    padded = torch.cat([tokens[:, :6], torch.randn(1, 4, 8) * 100], dim=1)
    torch.testing.assert_close(pooler(padded, valid), pooler(tokens[:, :6]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("text", ["16,abc", "16,,36", "0", "-16", "1.5"])
def test_bad_seq_len_lists_are_one_config_error(text):
    from contrastive.cli.eval import _seq_lens
    with pytest.raises(ConfigError, match="--seq-len takes comma-separated positive patch counts"):
        _seq_lens(text)


def test_seq_len_lists_parse_as_written():
    from contrastive.cli.eval import _seq_lens
    assert _seq_lens("64, 144,256") == [64, 144, 256]
    assert _seq_lens(None) == [None]
