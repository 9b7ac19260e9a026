"""Train a model: `contrastive-train` is a Hydra app over conf/train.yaml.

One process:   contrastive-train experiment=demo
Two processes: torchrun --nproc_per_node=2 -m contrastive.cli.train experiment=demo
Many nodes:    see launch/ (torchrun with a c10d rendezvous, or SLURM).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from contrastive.config import register_configs
from contrastive.errors import ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("contrastive.train")

register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def run(cfg: DictConfig) -> None:
    from contrastive.dist import shutdown_distributed
    from contrastive.eval.evaluators import build_evaluators
    from contrastive.train.trainer import Trainer

    try:
        trainer = Trainer(cfg, evaluators=build_evaluators(cfg.eval))
        result = trainer.train()
    except ConfigError as error:  # a user mistake or a diverged run (TrainingDiverged): one clear line
        log.error("%s", error)
        print(f"contrastive-train: error: {error}", file=sys.stderr)
        shutdown_distributed()
        sys.exit(2)
    if trainer.env.is_main and not result.preempted:
        log.info("finished at step %d, loss %s, %s", result.final_step, result.final_loss, result.eval_metrics)
    shutdown_distributed()


def main() -> None:
    run()


if __name__ == "__main__":
    main()
