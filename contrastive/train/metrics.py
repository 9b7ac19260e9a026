"""Where training metrics go: a metrics.jsonl in the run directory, wandb (offline by default), and a progress bar."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from contrastive.config import LoggerConfig
from contrastive.errors import ConfigError

log = logging.getLogger(__name__)


def wandb_run_id(run_dir: Path, run_name: str) -> str:
    """The wandb id of the run in `run_dir`: made once and kept there, so resuming continues the same wandb run
    while another run that happens to share the name (another directory) never merges into it."""
    path = run_dir / "wandb_run_id.txt"
    run_dir.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return path.read_text().strip()
    run_id = f"{run_name.replace('/', '-')}-{uuid.uuid4().hex[:8]}"
    path.write_text(run_id + "\n")
    return run_id


class MetricsLogger:
    """Only rank 0 builds a real one; other ranks get `enabled=False` and every call is a no-op."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict[str, Any], *,
                 enabled: bool, total_steps: int, start_step: int, progress_bar: bool) -> None:
        self.enabled = enabled
        self.wandb_run = None
        self.progress = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.wandb.mode != "disabled":
            self.wandb_run = self._start_wandb(cfg, run_dir, run_name, config)
        if progress_bar:
            self.progress = tqdm(total=total_steps, initial=start_step, desc=run_name, dynamic_ncols=True,
                                 mininterval=1.0)

    @staticmethod
    def _start_wandb(cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict[str, Any]):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            return wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity, name=run_name, tags=list(cfg.wandb.tags),
                dir=str(run_dir), mode=cfg.wandb.mode, config=config, resume="allow",
                id=wandb_run_id(run_dir, run_name),
            )
        except Exception as error:  # wandb raises many kinds; each is reported the same way
            if cfg.wandb.mode == "online":  # asked for explicitly: a run that silently logs nowhere is lost work
                raise ConfigError(f"logger=online: wandb could not start ({error}); fix the connection or "
                                  f"credentials, or use logger=offline (wandb sync later)") from error
            log.warning("wandb could not start (%s); continuing with metrics.jsonl only", error)
            return None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.progress is not None:
            shown = {k: metrics[k] for k in ("loss", "lr", "samples_per_second") if k in metrics}
            self.progress.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.progress is not None:
            self.progress.update(steps)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.close()
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
