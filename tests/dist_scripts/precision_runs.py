"""The same short training run in fp32 and then in bf16, in one process group, with what each precision computed
in: loss per logged step, the dtype of a tower's matmul outputs, of what the objective receives and returns, and of
the weights and optimiser state it checkpointed. Writes one JSON per rank.

    python tests/dist_scripts/precision_runs.py SHARDS RUN_ROOT OUT STRATEGY STEPS [OVERRIDE ...]
    torchrun --nproc_per_node=2 tests/dist_scripts/precision_runs.py SHARDS RUN_ROOT OUT fsdp 50
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from contrastive.checkpoint_io import list_checkpoints, load_checkpoint
from contrastive.dist import shutdown_distributed
from contrastive.train.trainer import Trainer
from tests.conftest import compose_config


def _dtype_names(tensors) -> list[str]:
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors if isinstance(t, torch.Tensor)})


def run(shards: str, run_dir: Path, precision: str, strategy: str, steps: int, overrides: list[str]) -> dict:
    cfg = OmegaConf.to_object(compose_config([
        "model=tiny_clip", "debug=tiny", f"data.sources.0.shards={shards}", f"run_dir={run_dir}",
        f"trainer.precision={precision}", f"dist.strategy={strategy}", "dist.device=cpu", "dist.backend=gloo",
        f"trainer.max_steps={steps}", "trainer.log_every=5", f"trainer.checkpoint_every={steps}",
        "optim.warmup_steps=10", *overrides]))
    trainer = Trainer(cfg)
    seen: dict[str, set[str]] = {"tower_matmul": set(), "objective_inputs": set(), "loss": set()}
    mlp_input_layer = next(m for name, m in trainer.model.named_modules() if name.endswith("mlp.c_fc"))
    mlp_input_layer.register_forward_hook(
        lambda module, inputs, output: seen["tower_matmul"].add(str(output.dtype).removeprefix("torch.")))
    objective = trainer.forward_backward.objective

    def recording_objective(output, batch, collectives):
        seen["objective_inputs"].update(_dtype_names(vars(output).values()))
        result = objective(output, batch, collectives)
        seen["loss"].add(str(result.loss.dtype).removeprefix("torch."))
        return result

    trainer.forward_backward.objective = recording_objective
    trainer.train()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if trainer.env.is_main else []
    # Under FSDP2 the checkpoint is sharded (DCP), whose optimiser state is read only when asked for.
    state = load_checkpoint(list_checkpoints(run_dir)[-1][1], sharded_parts=("model", "optimizer")) \
        if trainer.env.is_main else {}
    optimizer_tensors = [v for s in state.get("optimizer", {}).get("state", {}).values() for k, v in s.items()
                         if k != "step"]
    return {
        "losses": [row["loss"] for row in rows if "loss" in row],
        "computed_in": {name: sorted(dtypes) for name, dtypes in seen.items()},
        "checkpoint_weights": _dtype_names(state.get("model", {}).values()),
        "checkpoint_optimizer_state": _dtype_names(optimizer_tensors),
        "live_weights": _dtype_names(p.data for p in trainer.model.parameters()),
    }


def main(shards: str, run_root: str, out: str, strategy: str, steps: str, *overrides: str) -> None:
    results = {precision: run(shards, Path(run_root) / precision, precision, strategy, int(steps), list(overrides))
               for precision in ("fp32", "bf16")}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{os.environ.get('RANK', 0)}.json").write_text(json.dumps(results))
    shutdown_distributed()  # a rank that exits with its process group alive aborts ("terminate called ...")


if __name__ == "__main__":
    main(*sys.argv[1:])
