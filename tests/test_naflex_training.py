"""NaFlex (issue 17) beyond the two-tower path: CoCa on a NaFlex tower (its attentional pooler reads the valid
patches only), and a NaFlex tower under activation checkpointing, FSDP2 and torch.compile."""

from __future__ import annotations

import functools

import pytest
import torch

from contrastive.config import LossConfig
from contrastive.data.naflex import NaFlexResize, PatchNormalize, naflex_batch, pack
from contrastive.dist.collectives import LocalCollectives
from contrastive.errors import ConfigError
from contrastive.losses import build_loss
from contrastive.models import build_model
from contrastive.types import Batch, ModelOutput
from tests.conftest import compose_config, torchrun
from tests.test_accumulation import assert_same_gradients, gradients
from tests.test_naflex import _random_photo

NORMALIZE = PatchNormalize([0.5] * 3, [0.5] * 3, 7)


def _grids(max_patches: int):
    """A wide, a tall and a near-square image, each on its own grid of at most `max_patches` patches."""
    resize = NaFlexResize(7, "bilinear")
    return [resize(_random_photo(height, width, seed=height), max_patches=max_patches)
            for height, width in [(20, 60), (70, 25), (40, 45)]]


def test_naflex_coca_equals_each_image_alone_and_takes_no_gradient_from_padding():
    """A padded batch (three aspect ratios at 40 patches each, with padding) against each image run alone at its
    exact patch count (no padding): the same embeddings, caption logits, loss and parameter gradients, and the
    padding patches receive no gradient."""
    cfg = compose_config(["model=tiny_naflex_coca", "loss=coca", "model.text.vocab_size=300"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = build_loss(LossConfig(name="coca"))
    images = _grids(36)
    tokens = torch.randint(1, 300, (3, 16), generator=torch.Generator().manual_seed(1))
    tokens[:, 12:] = 0
    batch = Batch(images=torch.zeros(3), tokens=tokens)

    packed = pack(images, 40)
    assert not packed.valid.all()
    patches = NORMALIZE(packed.patches, packed.valid).requires_grad_(True)
    padded = model(patches, tokens, patch_coord=packed.coord, patch_valid=packed.valid)
    padded_loss = objective(padded, batch, LocalCollectives()).loss
    padded_loss.backward()
    padded_grads = gradients(model)
    assert patches.grad[packed.valid].abs().sum() > 0
    assert patches.grad[~packed.valid].abs().max() == 0

    model.zero_grad(set_to_none=True)
    alone = []
    for index, image in enumerate(images):
        single = pack([image], image.grid[0] * image.grid[1])
        assert single.valid.all()
        alone.append(model(NORMALIZE(single.patches, single.valid), tokens[index:index + 1],
                           patch_coord=single.coord, patch_valid=single.valid))
    joined = ModelOutput(**{name: torch.cat([getattr(out, name) for out in alone])
                            for name in ("image_features", "text_features", "caption_logits", "caption_targets")},
                         logit_scale=alone[0].logit_scale)
    alone_loss = objective(joined, batch, LocalCollectives()).loss
    alone_loss.backward()
    torch.testing.assert_close(padded.image_features, joined.image_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.caption_logits, joined.caption_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(padded_loss, alone_loss, atol=1e-5, rtol=0)
    assert_same_gradients(padded_grads, gradients(model))


def test_naflex_coca_has_no_open_clip_export(tmp_path):
    from contrastive.export.open_clip_format import export_open_clip
    model = build_model(compose_config(["model=tiny_naflex_coca", "model.text.vocab_size=300"]).model)
    with pytest.raises(ConfigError, match="no open_clip counterpart"):
        export_open_clip(model, tmp_path)


@pytest.mark.distributed
def test_naflex_loss_and_gradients_under_fsdp_with_and_without_activation_checkpointing_equal_one_process():
    result = torchrun(["tests/dist_scripts/naflex_parity.py"], nproc=2)
    verdicts = [line for line in result.stdout.splitlines() if line.startswith("naflex siglip fsdp")]
    assert len(verdicts) == 2 and all(line.endswith("OK") for line in verdicts), result.stdout


def test_compiled_naflex_blocks_compile_once_per_sequence_length(monkeypatch):
    """trainer.compile on a NaFlex tower over steps at lengths 16, 36, 16, 36: dynamo's graphs are counted by a
    backend that runs them as traced (the guards that decide recompiles do not depend on the backend). Expected: one
    graph per length for the image blocks and one for the text blocks, whose shapes never change; the repeated
    lengths compile nothing."""
    from contrastive.dist import init_distributed
    from contrastive.dist.parallel import parallelize

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", torch._dynamo.config.recompile_limit)
    torch._dynamo.reset()
    cfg = compose_config(["model=tiny_naflex_siglip", "loss=siglip"])
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), init_distributed("cpu"), compile_blocks=True, static_lengths=2)
    objective = build_loss(cfg.loss)
    resize = NaFlexResize(7, "bilinear")
    tokens = torch.randint(1, 1000, (4, 16), generator=torch.Generator().manual_seed(1))
    counts = []
    try:
        for step, seq_len in enumerate([16, 36, 16, 36]):
            photos = [_random_photo(15 + 11 * index, 80 - 9 * index, seed=step * 4 + index) for index in range(4)]
            packed = pack([resize(photo, max_patches=seq_len) for photo in photos], seq_len)
            batch = Batch(images=NORMALIZE(packed.patches, packed.valid), tokens=tokens, patch_coord=packed.coord,
                          patch_valid=packed.valid)
            output = model(batch.images, tokens, patch_coord=batch.patch_coord, patch_valid=batch.patch_valid)
            objective(output, batch, LocalCollectives()).loss.backward()
            counts.append(len(graphs))
    finally:
        torch._dynamo.reset()
    assert counts == [2, 3, 3, 3]


def test_load_encoder_reads_a_siglip2_vision_model_export_equal_to_our_tower(tmp_path):
    """contrastive-export --format transformers of a NaFlex SigLIP, read back by load_encoder: at two sequence
    lengths on a wide and a tall image (eval rows, as contrastive-eval --seq-len feeds them) its features equal our
    tower's; in a padded batch its valid patch tokens come in each image's grid and equal our tower's penultimate
    block (export.bundle.VisionEncoder on the tower itself); whole 28 x 28 images give our fixed-size features."""
    from contrastive.encoders import load_encoder, preprocess_from_config
    from contrastive.encoders.naflex import at_seq_len
    from contrastive.export.bundle import VisionEncoder
    from contrastive.export.transformers_format import export_transformers

    torch.manual_seed(0)
    model = build_model(compose_config(["model=tiny_naflex_siglip"]).model).eval()
    export_transformers(model, tmp_path)
    encoder = load_encoder(tmp_path)
    preprocess = preprocess_from_config(model.cfg)
    assert encoder.kind == "transformers" and encoder.preprocess == preprocess
    photos = [_random_photo(20, 70, seed=1), _random_photo(90, 25, seed=2)]
    close = {"atol": 1e-5, "rtol": 1e-5}
    with torch.no_grad():
        for max_patches in (36, 64):
            at_length = at_seq_len(encoder, max_patches)
            rows = torch.stack([at_length.preprocess.transform()(photo) for photo in photos])
            batch = naflex_batch(photos, preprocess, max_patches)
            ours = model.encode_image(batch.patches, patch_coord=batch.coord, patch_valid=batch.valid)
            torch.testing.assert_close(at_length.model.encode_image(rows), ours, **close)

        batch = naflex_batch(photos, preprocess, 36)
        assert not batch.valid.all()
        theirs = encoder.model.forward_naflex(batch.patches, batch.coord, batch.valid)
        reference = VisionEncoder(model.visual, preprocess).forward_naflex(batch.patches, batch.coord, batch.valid)
        assert [tuple(tokens.shape[:2]) for tokens in theirs.patch_tokens] == [(3, 11), (11, 3)]
        for got, expected in zip(theirs.patch_tokens, reference.patch_tokens):
            torch.testing.assert_close(got, expected, **close)
        torch.testing.assert_close(theirs.pooled, reference.pooled, **close)

        images = torch.randn(2, 3, 28, 28)
        torch.testing.assert_close(encoder.model.encode_image(images), model.encode_image(images), **close)


def test_logged_flops_follow_each_steps_sequence_length(tmp_path):
    """Four NaFlex steps at lengths drawn from [16, 36], logged once: the logged FLOP/s per sample/s is the mean of
    the four steps' FLOPs per sample, each counted here (FlopCounterMode on a forward and backward of 4 samples at
    that length), not the FLOPs of one step's length."""
    import json
    import random

    from torch.utils.flop_counter import FlopCounterMode

    from contrastive.data.naflex import seq_len_for_step
    from contrastive.train.trainer import Trainer
    from tests.data_factory import jpeg, write_tar

    rng = random.Random(0)
    write_tar(tmp_path / "0.tar", [(f"{index:03d}", {"jpg": jpeg((rng.randint(10, 90), rng.randint(10, 90)), index),
                                                     "txt": f"item {index}".encode()}) for index in range(40)])
    lengths = [16, 36]
    cfg = compose_config(["model=tiny_naflex_siglip", "loss=siglip", "debug=tiny", f"data.sources.0.shards={tmp_path}",
                          "data.naflex_seq_lens=[16,36]", "data.batch_size=8", f"run_dir={tmp_path / 'run'}",
                          "trainer.log_every=4", "trainer.checkpoint_every=100", "trainer.threads_per_process=1"])
    steps = [seq_len_for_step(cfg.seed, step, lengths) for step in range(4)]
    assert set(steps) == set(lengths)  # both lengths in the one log window
    Trainer(cfg).train()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [entry for entry in logged if "flops_per_second_per_device" in entry]
    assert [entry["step"] for entry in logged] == [4]

    model = build_model(cfg.model)
    objective = build_loss(cfg.loss)
    tokens = torch.randint(1, 1000, (4, 16))

    def counted(seq_len: int) -> float:
        batch = Batch(images=torch.randn(4, seq_len, 147), tokens=tokens,
                      patch_coord=torch.zeros(4, seq_len, 2, dtype=torch.long),
                      patch_valid=torch.ones(4, seq_len, dtype=torch.bool))
        with FlopCounterMode(display=False) as counter:
            output = model(batch.images, tokens, patch_coord=batch.patch_coord, patch_valid=batch.patch_valid)
            objective(output, batch, LocalCollectives()).loss.backward()
        return counter.get_total_flops() / 4

    per_length = {seq_len: counted(seq_len) for seq_len in lengths}
    expected = sum(per_length[seq_len] for seq_len in steps) / len(steps)
    assert per_length[36] > 2 * per_length[16]
    got = logged[0]["flops_per_second_per_device"] / logged[0]["samples_per_second"]
    assert got == pytest.approx(expected, rel=1e-6)
