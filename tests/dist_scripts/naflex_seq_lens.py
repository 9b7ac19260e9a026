"""Run under torchrun: every rank reads STEPS NaFlex batches (2 DataLoader workers) and rank 0 writes, per rank,
each step's padded sequence length and the largest patch count of an image in it, as JSON to OUT.

    torchrun --nproc_per_node=2 tests/dist_scripts/naflex_seq_lens.py SHARDS STEPS OUT
"""

from __future__ import annotations

import json
import sys

from hydra import compose, initialize_config_dir

from contrastive.config import register_configs
from contrastive.data.loader import build_train_loader
from contrastive.dist import init_distributed, shutdown_distributed
from contrastive.encoders import preprocess_from_config
from contrastive.models import build_tokenizer
from tests.conftest import CONF_DIR

SEQ_LENS = "data.naflex_seq_lens=[16,36,64]"


def main(shards: str, steps: int, out: str) -> None:
    env = init_distributed("cpu", "gloo")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny_naflex_siglip", "debug=tiny", f"data.sources.0.shards={shards}",
                                          SEQ_LENS, "data.num_workers=2", "data.batch_size=8"])
    loader = build_train_loader(cfg.data, preprocess_from_config(cfg.model), build_tokenizer(cfg.model),
                                rank=env.rank, world_size=env.world_size, seed=cfg.seed)
    batches = iter(loader)
    lengths, largest, keys = [], [], []
    for _ in range(steps):
        batch = next(batches)
        lengths.append(batch.images.shape[1])
        largest.append(int(batch.patch_valid.sum(1).max()))
        keys += batch.keys
    gathered = env.collectives.all_gather_object({"lengths": lengths, "largest": largest, "keys": keys})
    if env.rank == 0:
        with open(out, "w") as handle:
            json.dump(gathered, handle)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
