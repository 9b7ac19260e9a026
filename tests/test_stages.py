"""trainer.stages: smaller images and shorter texts for the first part of a run, the data stream continuing exactly
across each switch, resume landing in the stage of its step, and the FLOP counter counting each stage's sizes."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import torch

from contrastive.checkpoint_io import list_checkpoints, load_checkpoint
from contrastive.errors import ConfigError
from contrastive.train.stages import build_stages, stage_at
from contrastive.train.trainer import Trainer
from tests.conftest import compose_config, tiny_run_overrides

STAGES = "trainer.stages=[{until: 0.5, image_size: 14, context_length: 8}]"


def _run(demo_root: Path, run_dir: Path, *overrides: str) -> list[tuple[list[str], tuple, tuple]]:
    """Train in this process; returns each step's (keys, image shape, token shape)."""
    cfg = compose_config([*tiny_run_overrides(demo_root, run_dir), "trainer.max_steps=6", "trainer.log_every=2",
                          "data.num_workers=1", "trainer.keep_last_checkpoints=10", *overrides])
    trainer = Trainer(cfg)
    seen, forward_backward = [], trainer.forward_backward

    def recording(batch):
        seen.append((list(batch.keys), tuple(batch.images.shape), tuple(batch.tokens.shape)))
        return forward_backward(batch)

    trainer.forward_backward = recording
    trainer.train()
    trainer.loader = None  # its data-loader worker stops when the loader is collected
    gc.collect()
    return seen


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(run_dir)[-1][1])["model"]


def test_stage_boundaries_are_fractions_of_the_run_and_bad_sizes_are_refused():
    cfg = compose_config(["model=test_tiny", "trainer.max_steps=10",
                          "trainer.stages=[{until: 0.25, image_size: 14, context_length: 4}, {until: 0.6}]"])
    stages = build_stages(cfg)
    assert [(s.first_step, s.end_step, s.image_size, s.context_length) for s in stages] == [
        (0, 3, 14, 4), (3, 6, 28, 16), (6, 10, 28, 16)]
    assert [stage_at(stages, step).index for step in range(11)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert len(build_stages(compose_config(["model=test_tiny"]))) == 1
    with pytest.raises(ConfigError, match="not a multiple of the patch size 7"):
        build_stages(compose_config(["model=test_tiny", "trainer.stages=[{until: 0.5, image_size: 20}]"]))
    with pytest.raises(ConfigError, match="must be in \\[1, 16\\]"):
        build_stages(compose_config(["model=test_tiny", "trainer.stages=[{until: 0.5, context_length: 32}]"]))
    with pytest.raises(ConfigError, match="length_bucketing needs a causal text tower"):
        build_stages(compose_config(["model=tiny_siglip", "data.length_bucketing=true"]))
    assert len(build_stages(compose_config(["model=tiny_clip", "data.length_bucketing=true"]))) == 1


def test_stages_switch_sizes_keep_the_stream_and_resume_in_the_right_stage(demo_root, tmp_path):
    plain = _run(demo_root, tmp_path / "plain")
    staged = _run(demo_root, tmp_path / "staged", STAGES)
    # The switch after step 3 continues the stream where it stood: the same samples in the same order.
    assert [keys for keys, _, _ in staged] == [keys for keys, _, _ in plain]
    assert [(images[-1], tokens[-1]) for _, images, tokens in staged] == [(14, 8)] * 3 + [(28, 16)] * 3
    # Resumed from its step-2 checkpoint (before the switch) and its step-4 one (after it), a run ends with the
    # weights of the uninterrupted run, having trained each step at the sizes of its stage.
    straight = _final_weights(tmp_path / "staged")
    for step, sizes in [(2, [(14, 8)] + [(28, 16)] * 3), (4, [(28, 16)] * 2)]:
        resumed_dir = tmp_path / f"resumed_{step}"
        checkpoint = dict(list_checkpoints(tmp_path / "staged"))[step]
        (resumed_dir / checkpoint.parent.name).mkdir(parents=True)
        shutil.copy(checkpoint, resumed_dir / checkpoint.parent.name / checkpoint.name)
        resumed = _run(demo_root, resumed_dir, STAGES, "resume=latest")
        assert [(images[-1], tokens[-1]) for _, images, tokens in resumed] == sizes
        assert [keys for keys, _, _ in resumed] == [keys for keys, _, _ in staged[step:]]
        for name, value in _final_weights(resumed_dir).items():
            torch.testing.assert_close(value, straight[name], rtol=0, atol=0, msg=name)


def test_flop_counter_counts_each_stage_at_its_sizes(demo_root, tmp_path):
    """The trainer counts FLOPs per stage; a 14 px / 8-token stage of the 28 px / 16-token model costs about a
    quarter of the image tower's and half of the text tower's FLOPs."""
    cfg = compose_config([*tiny_run_overrides(demo_root, tmp_path / "run"), STAGES, "trainer.max_steps=4",
                          "trainer.log_every=1"])
    trainer = Trainer(cfg)
    trainer.train()
    small, full = trainer.flops_per_sample[0], trainer.flops_per_sample[1]
    from contrastive.train.flops import flops_per_sample

    batch = trainer.normalize.batch(next(iter(trainer.loader)))
    assert full == pytest.approx(flops_per_sample(trainer.model, trainer.objective, batch))
    assert 0.2 * full < small < 0.6 * full
