"""Run under torchrun: each rank computes a loss on its slice of a seeded global batch; rank 0 checks the loss and
the gradients (image features, text features, logit scale, logit bias) against (a) the one-process materialised
loss on the whole batch and (b) open_clip's distributed loss on the same slices. Prints one line per loss and
block size and exits non-zero on any mismatch.

    torchrun --nproc_per_node=3 tests/dist_scripts/loss_parity.py --losses clip,siglip --block-sizes none,3,64
"""

from __future__ import annotations

import argparse
import sys

import distillation_parity  # beside this script, which torchrun puts first on sys.path
import open_clip.loss
import torch
import torch.distributed as dist
import torch.nn.functional as F

from contrastive.config import LossConfig
from contrastive.dist import LocalCollectives, init_distributed, shutdown_distributed
from contrastive.losses import build_loss
from contrastive.types import Batch, ModelOutput

RTOL, ATOL = 1e-5, 1e-7  # fp32


def make_inputs(global_batch: int, dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(global_batch, dim, generator=generator, dtype=torch.float64), dim=-1).float()
    texts = F.normalize(torch.randn(global_batch, dim, generator=generator, dtype=torch.float64), dim=-1).float()
    return images, texts


def loss_and_grads(compute_loss, images, texts):
    """compute_loss(images, texts, scale, bias) -> scalar; returns the loss and its four gradients."""
    images = images.clone().requires_grad_(True)
    texts = texts.clone().requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-5.0, requires_grad=True)
    loss = compute_loss(images, texts, scale, bias)
    loss.backward()
    bias_grad = bias.grad if bias.grad is not None else torch.tensor(0.0)
    return loss.detach(), images.grad, texts.grad, scale.grad, bias_grad


def ours(loss_name: str, block_size: int | None, collectives):
    objective = build_loss(LossConfig(name=loss_name, block_size=block_size))

    def compute_loss(images, texts, scale, bias):
        output = ModelOutput(image_features=images, text_features=texts, logit_scale=scale, logit_bias=bias)
        batch = Batch(images=torch.empty(len(images), 0), tokens=torch.empty(len(images), 0, dtype=torch.long))
        return objective(output, batch, collectives).loss

    return compute_loss


def open_clips(loss_name: str, rank: int, world_size: int):
    if loss_name == "siglip":
        return open_clip.loss.SigLipLoss(rank=rank, world_size=world_size, dist_impl="bidir")
    reference = open_clip.loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    return lambda images, texts, scale, bias: reference(images, texts, scale)


def global_view(results, collectives, world_size: int):
    """The global loss is the mean of the rank losses; DDP averages parameter gradients the same way."""
    loss, image_grad, text_grad, scale_grad, bias_grad = results
    image_grads = [torch.empty_like(image_grad) for _ in range(world_size)]
    text_grads = [torch.empty_like(text_grad) for _ in range(world_size)]
    if world_size > 1:
        dist.all_gather(image_grads, image_grad / world_size)
        dist.all_gather(text_grads, text_grad / world_size)
    else:
        image_grads, text_grads = [image_grad], [text_grad]
    return {
        "loss": collectives.all_reduce_mean(loss),
        "image_grad": torch.cat(image_grads),
        "text_grad": torch.cat(text_grads),
        "scale_grad": collectives.all_reduce_mean(scale_grad),
        "bias_grad": collectives.all_reduce_mean(bias_grad),
    }


def mismatches(label: str, got: dict, want: dict) -> list[str]:
    return [f"{label} {name}: max abs diff {(got[name] - want[name]).abs().max().item():.3e}"
            for name in got if not torch.allclose(got[name], want[name], rtol=RTOL, atol=ATOL)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--losses", default="clip", help="comma-separated registry names")
    parser.add_argument("--local-batch", type=int, default=5)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--block-sizes", default="none", help="comma-separated; 'none' is the materialised loss")
    parser.add_argument("--distillation", action="store_true",
                        help="also check the distillation terms (tests/dist_scripts/distillation_parity.py) in this "
                        "launch, which saves starting the ranks again")
    args = parser.parse_args()
    block_sizes = [None if size == "none" else int(size) for size in args.block_sizes.split(",")]
    env = init_distributed("cpu", "gloo")
    world, rank, local = env.world_size, env.rank, args.local_batch
    images, texts = make_inputs(world * local, args.dim, seed=1234)
    rows = slice(rank * local, (rank + 1) * local)

    all_ok = True
    for loss_name in args.losses.split(","):
        reference = global_view(loss_and_grads(open_clips(loss_name, rank, world), images[rows], texts[rows]),
                                env.collectives, world)
        one_process = loss_and_grads(ours(loss_name, None, LocalCollectives()), images, texts) if rank == 0 else None
        for block_size in block_sizes:
            got = global_view(loss_and_grads(ours(loss_name, block_size, env.collectives), images[rows], texts[rows]),
                              env.collectives, world)
            if rank == 0:
                full = dict(zip(got, one_process))
                failures = mismatches("vs one process", got, full) + mismatches("vs open_clip", got, reference)
                all_ok &= not failures
                print(f"{loss_name} world={world} block_size={block_size}: loss {got['loss'].item():.6f} "
                      f"(one process {full['loss'].item():.6f}, open_clip {reference['loss'].item():.6f}); "
                      + ("OK" if not failures else "FAIL " + "; ".join(failures)), flush=True)
    if args.distillation:
        all_ok &= distillation_parity.check(env, block_sizes, local, args.dim)
    ok = env.collectives.broadcast_object(all_ok) if world > 1 else all_ok
    shutdown_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
