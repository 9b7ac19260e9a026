"""Run under torchrun (alone, or from loss_parity.py --distillation): each rank computes the distillation loss
(student CLIP loss plus every distillation term of two teachers) on its slice of a seeded global batch; rank 0
checks the loss and the gradients (student image and text features, logit scale and bias, adaptor outputs) against
the one-process loss on the whole batch. Prints one line per block size and exits non-zero on any mismatch.

    torchrun --nproc_per_node=3 tests/dist_scripts/distillation_parity.py --block-sizes none,3,64
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from contrastive.config import DistillationConfig, LossConfig, TeacherConfig
from contrastive.dist import LocalCollectives, init_distributed, shutdown_distributed
from contrastive.losses import build_loss
from contrastive.types import Batch, ModelOutput, TeacherTargets

RTOL, ATOL = 1e-5, 1e-7  # fp32
TEACHERS = {"wide": (12, 0.7), "narrow": (6, 0.3)}  # name -> (width, weight)
GRIDS = {"wide": 3, "narrow": 2}  # teacher patch grids; the student's is 2 x 2


def make_inputs(global_batch: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1).float()

    inputs = {"images": unit(global_batch, dim), "texts": unit(global_batch, dim)}
    for name, (width, _) in TEACHERS.items():
        inputs[f"{name}_images"] = unit(global_batch, width)
        inputs[f"{name}_texts"] = unit(global_batch, width)
        inputs[f"{name}_adapted"] = torch.randn(global_batch, width, generator=generator)
        inputs[f"{name}_adapted_tokens"] = torch.randn(global_batch, 4, width, generator=generator)
        inputs[f"{name}_tokens"] = torch.randn(global_batch, GRIDS[name] ** 2, width, generator=generator) * 3 + 1
    return inputs


def objective(block_size: int | None):
    teachers = [TeacherConfig(name=name, path="unused", weight=weight) for name, (_, weight) in TEACHERS.items()]
    cfg = DistillationConfig(teachers=teachers, contrastive_weight=1.0, sigmoid_weight=0.5, feature_weight=0.3,
                             patch_weight=0.2)
    return build_loss(LossConfig(name="clip", block_size=block_size, distillation=cfg))


GRADIENT_INPUTS = ["images", "texts", *(f"{name}_{kind}" for name in TEACHERS for kind in ("adapted",
                                                                                          "adapted_tokens"))]


def loss_and_grads(compute, inputs: dict[str, torch.Tensor], collectives):
    """The loss and the gradients of the student's inputs (features, adaptor outputs, scale, bias)."""
    leaves = {name: inputs[name].clone().requires_grad_(True) for name in GRADIENT_INPUTS}
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-5.0, requires_grad=True)
    output = ModelOutput(
        image_features=leaves["images"], text_features=leaves["texts"], logit_scale=scale, logit_bias=bias,
        adapted_features={name: leaves[f"{name}_adapted"] for name in TEACHERS},
        adapted_patch_tokens={name: leaves[f"{name}_adapted_tokens"] for name in TEACHERS},
    )
    teachers = {name: TeacherTargets(image_features=inputs[f"{name}_images"], text_features=inputs[f"{name}_texts"],
                                     logit_scale=torch.tensor(20.0), logit_bias=torch.tensor(-3.0),
                                     patch_tokens=inputs[f"{name}_tokens"])
                for name in TEACHERS}
    count = len(inputs["images"])
    batch = Batch(images=torch.empty(count, 0), tokens=torch.empty(count, 0, dtype=torch.long), teachers=teachers)
    loss = compute(output, batch, collectives).loss
    loss.backward()
    return {"loss": loss.detach(), "scale_grad": scale.grad, "bias_grad": bias.grad,
            **{f"{name}_grad": leaf.grad for name, leaf in leaves.items()}}


def global_view(results: dict[str, torch.Tensor], collectives, world_size: int) -> dict[str, torch.Tensor]:
    """The global loss is the mean of the rank losses; DDP averages parameter gradients the same way."""
    merged = {}
    for name, value in results.items():
        if value.ndim == 0:
            merged[name] = collectives.all_reduce_mean(value)
            continue
        parts = [torch.empty_like(value) for _ in range(world_size)]
        if world_size > 1:
            dist.all_gather(parts, value.contiguous() / world_size)
        else:
            parts = [value]
        merged[name] = torch.cat(parts)
    return merged


def check(env, block_sizes: list[int | None], local: int, dim: int) -> bool:
    """Print one verdict line per block size on rank 0; True where every one matched (on rank 0)."""
    world, rank = env.world_size, env.rank
    inputs = make_inputs(world * local, dim, seed=4321)
    rows = slice(rank * local, (rank + 1) * local)
    mine = {name: value[rows] for name, value in inputs.items()}
    one_process = loss_and_grads(objective(None), inputs, LocalCollectives()) if rank == 0 else None
    all_ok = True
    for block_size in block_sizes:
        got = global_view(loss_and_grads(objective(block_size), mine, env.collectives), env.collectives, world)
        if rank == 0:
            failures = [f"{name}: max abs diff {(got[name] - one_process[name]).abs().max().item():.3e}"
                        for name in got if not torch.allclose(got[name], one_process[name], rtol=RTOL, atol=ATOL)]
            all_ok &= not failures
            print(f"distillation world={world} block_size={block_size}: loss {got['loss'].item():.6f} "
                  f"(one process {one_process['loss'].item():.6f}); "
                  + ("OK" if not failures else "FAIL " + "; ".join(failures)), flush=True)
    return all_ok


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local-batch", type=int, default=5)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--block-sizes", default="none", help="comma-separated; 'none' is the materialised loss")
    args = parser.parse_args()
    block_sizes = [None if size == "none" else int(size) for size in args.block_sizes.split(",")]
    env = init_distributed("cpu", "gloo")
    all_ok = check(env, block_sizes, args.local_batch, args.dim)
    ok = env.collectives.broadcast_object(all_ok) if env.world_size > 1 else all_ok
    shutdown_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
