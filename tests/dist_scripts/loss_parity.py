"""Run under torchrun: each rank computes a loss on its slice of a seeded global batch; rank 0 checks the loss
and gradients against the one-process loss on the whole batch. Exits non-zero on mismatch."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from contrastive.config import LossConfig
from contrastive.dist import LocalCollectives, init_distributed, shutdown_distributed
from contrastive.losses import build_loss
from contrastive.types import Batch, ModelOutput


def make_inputs(global_batch: int, dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(global_batch, dim, generator=generator, dtype=torch.float64), dim=-1).float()
    texts = F.normalize(torch.randn(global_batch, dim, generator=generator, dtype=torch.float64), dim=-1).float()
    return images, texts


def loss_and_grads(loss_name: str, images, texts, collectives):
    images = images.clone().requires_grad_(True)
    texts = texts.clone().requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-5.0, requires_grad=True)
    output = ModelOutput(image_features=images, text_features=texts, logit_scale=scale, logit_bias=bias)
    batch = Batch(images=torch.empty(len(images), 0), tokens=torch.empty(len(images), 0, dtype=torch.long))
    loss = build_loss(LossConfig(name=loss_name))(output, batch, collectives).loss
    loss.backward()
    bias_grad = bias.grad if bias.grad is not None else torch.tensor(0.0)
    return loss.detach(), images.grad, texts.grad, scale.grad, bias_grad


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loss", default="clip")
    parser.add_argument("--local-batch", type=int, default=5)
    parser.add_argument("--dim", type=int, default=8)
    args = parser.parse_args()
    env = init_distributed("cpu", "gloo")
    world, rank, local = env.world_size, env.rank, args.local_batch
    images, texts = make_inputs(world * local, args.dim, seed=1234)
    rows = slice(rank * local, (rank + 1) * local)

    loss, image_grad, text_grad, scale_grad, bias_grad = loss_and_grads(
        args.loss, images[rows], texts[rows], env.collectives)
    # The global loss is the mean of the rank losses; DDP averages parameter gradients the same way.
    loss = env.collectives.all_reduce_mean(loss)
    scale_grad, bias_grad = env.collectives.all_reduce_mean(scale_grad), env.collectives.all_reduce_mean(bias_grad)
    image_grads = [torch.empty_like(image_grad) for _ in range(world)]
    text_grads = [torch.empty_like(text_grad) for _ in range(world)]
    dist.all_gather(image_grads, image_grad / world)
    dist.all_gather(text_grads, text_grad / world)

    failures = []
    if rank == 0:
        ref_loss, ref_image, ref_text, ref_scale, ref_bias = loss_and_grads(args.loss, images, texts, LocalCollectives())
        checks = {
            "loss": (loss, ref_loss),
            "image_grad": (torch.cat(image_grads), ref_image),
            "text_grad": (torch.cat(text_grads), ref_text),
            "scale_grad": (scale_grad, ref_scale),
            "bias_grad": (bias_grad, ref_bias),
        }
        for name, (got, want) in checks.items():
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-7):
                failures.append(f"{name}: max abs diff {(got - want).abs().max().item():.3e}")
        print(f"{args.loss} world={world}: loss {loss.item():.6f} vs {ref_loss.item():.6f};",
              "OK" if not failures else "; ".join(failures), flush=True)
    ok = env.collectives.broadcast_object(not failures)
    shutdown_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
