"""Run under torchrun: two LAMB steps of a small block model under FSDP2 (each rank a half of the batch) against
the same steps in one process on the whole batch; rank 0 compares the weights and prints "lamb fsdp parity ok".

The weights' rows differ in scale between the two halves of dim 0, so each rank's shard has its own norm: a trust
ratio from shard norms would move the shards by different factors and miss the one-process step.

    torchrun --nproc_per_node=2 tests/dist_scripts/lamb_fsdp.py
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from contrastive.config import OptimConfig
from contrastive.dist import init_distributed, shutdown_distributed
from contrastive.dist.parallel import gather_model_state, parallelize
from contrastive.train.optim import build_optimizer, optimizer_step

STEPS, BATCH, WIDTH = 2, 8, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x)).tanh()


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, WIDTH)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(WIDTH, 3)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))  # 0-d: FSDP leaves it whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x) * self.logit_scale


def train(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    cfg = OptimConfig(optimizer="contrastive.train.lamb.Lamb", lr=0.05, weight_decay=0.1, warmup_steps=0)
    optimizer = build_optimizer(model, cfg)
    for _ in range(STEPS):
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer_step(model.parameters(), optimizer, max_grad_norm=1.0)


def main() -> int:
    env = init_distributed("cpu")
    torch.manual_seed(0)
    model = Model()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 1:
                parameter[: len(parameter) // 2] *= 10.0  # shard 0's rows are 10x shard 1's
    reference = copy.deepcopy(model)
    inputs, targets = torch.randn(BATCH, 4), torch.randn(BATCH, 3)
    half = BATCH // env.world_size
    parallelize(model, env, "fsdp")
    train(model, inputs[env.rank * half:(env.rank + 1) * half], targets[env.rank * half:(env.rank + 1) * half])
    state = gather_model_state(model)
    failed = 0
    if env.rank == 0:
        train(reference, inputs, targets)
        for name, expected in reference.state_dict().items():
            moved = (expected - state[name]).abs().max().item()
            try:
                torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-6, msg=name)
            except AssertionError as error:
                print(error)
                failed += 1
            print(f"{name}: max difference {moved:.2e}")
        print("lamb fsdp parity ok" if not failed else f"lamb fsdp parity FAILED for {failed} tensors", flush=True)
    shutdown_distributed()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
