"""Run under torchrun: every rank reads its planned steps of a finite epoch-mode run (2 DataLoader workers) and
rank 0 checks, over all ranks, that no key is seen twice, that the ranks agreed on the last step, and that the
unseen keys are exactly the stated leftover. Writes the figures as JSON to OUT.

    torchrun --nproc_per_node=2 tests/dist_scripts/data_epoch_keys.py SHARDS TOTAL_SAMPLES OUT
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from hydra import compose, initialize_config_dir

from contrastive.config import register_configs
from contrastive.data.loader import build_train_loader, plan_run
from contrastive.data.transforms import Preprocess
from contrastive.dist import init_distributed, shutdown_distributed
from contrastive.models import build_tokenizer
from contrastive.models.towers import model_image_size
from tests.conftest import CONF_DIR


def main(shards: str, total: int, out: str) -> None:
    env = init_distributed("cpu", "gloo")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=test_tiny", "debug=tiny", f"data.sources.0.shards={shards}",
                                          "data.resampled=false", "data.epochs=1", "data.num_workers=2",
                                          "data.batch_size=8"])
    plan = plan_run(cfg.data, world_size=env.world_size, seed=cfg.seed)
    preprocess = Preprocess(model_image_size(cfg.model), list(cfg.model.image_mean), list(cfg.model.image_std),
                            cfg.model.interpolation)
    loader = build_train_loader(cfg.data, preprocess, build_tokenizer(cfg.model), rank=env.rank,
                                world_size=env.world_size, seed=cfg.seed)
    batches = iter(loader)
    keys, past_plan = [], 0
    for _ in range(plan.steps):
        batch = next(batches)
        keys += batch.keys
        past_plan += batch.stream_position.past_plan_samples
    gathered = env.collectives.all_gather_object({"steps": plan.steps, "keys": keys, "past_plan": past_plan})
    if env.rank == 0:
        seen = Counter(key for part in gathered for key in part["keys"])
        figures = {"steps": [part["steps"] for part in gathered], "distinct": len(seen),
                   "repeats": sum(count - 1 for count in seen.values()), "leftover": plan.leftover_samples,
                   "unseen": total - len(seen), "past_plan": sum(part["past_plan"] for part in gathered)}
        with open(out, "w") as handle:
            json.dump(figures, handle)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
