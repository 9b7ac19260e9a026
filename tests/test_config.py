"""Every config in conf/ composes against the typed schema, and the schema rejects mistakes clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import contrastive.train.trainer as trainer_module
from contrastive.config import ModelConfig, TrainConfig, validate
from contrastive.errors import ConfigError
from contrastive.losses import list_losses
from contrastive.models import build_model, list_models
from contrastive.models.towers import model_image_size
from tests.conftest import CONF_DIR, compose_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
GLOBAL_GROUPS = {"experiment", "debug"}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _validate(cfg, world_size: int = 1) -> None:
    validate(cfg, world_size, model_archs=list_models(), loss_names=list_losses())


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    schema_fields = set(OmegaConf.structured(TrainConfig).keys())
    assert schema_fields <= set(cfg.keys())
    if group not in GLOBAL_GROUPS and group != "data":
        _validate(cfg)


@pytest.mark.parametrize("option", _options("experiment"))
def test_every_experiment_validates_and_builds_its_model(option):
    cfg = compose_config([f"experiment={option}"])
    _validate(cfg)
    build_model(cfg.model)


@pytest.mark.parametrize("option", _options("model"))
def test_every_model_config_builds(option):
    # On the meta device: the whole module tree with every shape, nothing allocated or initialised (So400m's two
    # towers hold 0.9B parameters). The experiments above build real weights.
    with torch.device("meta"):
        build_model(compose_config([f"model={option}"]).model)


def test_unknown_key_and_wrong_type_fail_at_composition():
    with pytest.raises(ConfigCompositionException, match="data.bogus"):
        compose_config(["data.bogus=1"])
    with pytest.raises(ConfigCompositionException, match="data.batch_size"):
        compose_config(["data.batch_size=abc"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.schedule=exponential", "optim.schedule='exponential' is not one of cosine, linear, constant"),
        ("data.crop_scale=[0.5,1.5]", "data.crop_scale must be [low, high]"),
        ("trainer.precision=fp8", "trainer.precision='fp8'"),
        ("resume=somewhere", "resume must be null, 'latest', a checkpoint .pt file or a sharded checkpoint directory"),
        ("data.sources=[]", "data.sources is empty"),
        ("data.read_attempts=0", "data.read_attempts must be at least 1, got 0"),
        ("data.retry_wait_s=-1", "data.retry_wait_s must be >= 0, got -1"),
        ("model.arch=nonsense", "model.arch='nonsense' is not one of cappa, clip, coca"),
        ("loss.name=nonsense", "loss.name='nonsense' is not one of cappa, clip, coca, siglip"),
    ],
)
def test_validate_names_the_bad_key(override, message):
    cfg = compose_config([override])
    with pytest.raises(ValueError) as error:
        _validate(cfg)
    assert message in str(error.value)


def test_a_non_square_image_size_is_named():
    # The one square-size check behind the model's, the exports' and the open_clip loader's input size.
    with pytest.raises(ConfigError, match="model.vision.image_size is 32x16, not square"):
        model_image_size(ModelConfig(embed_dim=32, vision={"image_size": [32, 16]}))


def test_every_experiment_names_its_launch_command():
    for path in Path(CONF_DIR, "experiment").glob("*.yaml"):
        header = path.read_text().split("\n\n")[0]
        assert "torchrun" in header or "sbatch" in header, f"{path.name} has no launch command in its header"


@pytest.mark.parametrize("combined", ["data.length_bucketing=true", "trainer.stages=[{until: 0.5, image_size: 14}]"])
def test_extra_views_refuse_stages_and_length_bucketing(combined):
    _validate(compose_config(["data.local_views=2"]))  # alone, the extra views are a valid setting
    with pytest.raises(ValueError, match="do not combine with trainer.stages or data.length_bucketing"):
        _validate(compose_config(["data.local_views=2", combined]))


def test_training_threads_default_to_the_cores_the_data_workers_leave(monkeypatch):
    """8 cores shared by 2 local ranks: 4 each, less one per data worker, at least one; an explicit setting wins."""
    monkeypatch.setattr(trainer_module.os, "cpu_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    before = torch.get_num_threads()
    try:
        for workers, threads in ((0, 4), (1, 3), (3, 1), (6, 1)):
            trainer_module._set_threads(compose_config([f"data.num_workers={workers}"]))
            assert torch.get_num_threads() == threads, workers
        trainer_module._set_threads(compose_config(["data.num_workers=6", "trainer.threads_per_process=5"]))
        assert torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(before)
