"""Run under torchrun: loss=siglip_locca on a tiny siglip_locca model, each rank on its slice of a seeded global
batch, wrapped for DDP and then for FSDP2; rank 0 checks the loss and every parameter's gradient against the same
model run in one process on the whole batch. Prints one line per strategy and exits non-zero on any mismatch.

    torchrun --nproc_per_node=2 tests/dist_scripts/locca_parity.py
"""

from __future__ import annotations

import copy
import sys

import torch

from contrastive.dist import LocalCollectives, init_distributed, shutdown_distributed
from contrastive.dist.parallel import parallelize
from contrastive.losses import build_loss
from contrastive.models import build_model
from contrastive.types import Batch
from tests.conftest import compose_config
from tests.dist_scripts.parity import full_gradients, parity_failures, report

RTOL, ATOL = 1e-4, 1e-6  # fp32; the reductions differ in order from the one-process sums
LOCAL_BATCH = 3


def global_batch(world: int, vocab: int, length: int) -> Batch:
    generator = torch.Generator().manual_seed(7)
    size = world * LOCAL_BATCH
    tokens = torch.randint(1, vocab, (size, length), generator=generator)
    decoder_tokens = torch.randint(1, vocab, (size, length), generator=generator)
    decoder_tokens[:, -3:] = 0  # padding, not scored
    prompt_lengths = torch.randint(1, 5, (size,), generator=generator)
    return Batch(images=torch.randn(size, 3, 64, 64, generator=generator), tokens=tokens,
                 decoder_tokens=decoder_tokens, decoder_prompt_lengths=prompt_lengths,
                 decoder_tasks=torch.arange(size) % 3)


def rows(batch: Batch, start: int, stop: int) -> Batch:
    return Batch(images=batch.images[start:stop], tokens=batch.tokens[start:stop],
                 decoder_tokens=batch.decoder_tokens[start:stop],
                 decoder_prompt_lengths=batch.decoder_prompt_lengths[start:stop],
                 decoder_tasks=batch.decoder_tasks[start:stop])


def loss_and_gradients(model, objective, batch: Batch, collectives) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    output = model(batch.images, batch.tokens, decoder_tokens=batch.decoder_tokens,
                   decoder_prompt_lengths=batch.decoder_prompt_lengths)
    loss = objective(output, batch, collectives).loss
    loss.backward()
    return loss.detach(), full_gradients(model)


def main() -> int:
    env = init_distributed("cpu", "gloo")
    cfg = compose_config(["model=tiny_siglip_locca", "loss=siglip_locca", "model.text.vocab_size=500",
                          "model.text.context_length=12"])
    torch.manual_seed(0)
    reference = build_model(cfg.model)
    objective = build_loss(cfg.loss)
    batch = global_batch(env.world_size, 500, 12)
    expected_loss, expected = loss_and_gradients(reference, objective, batch, LocalCollectives())
    local = rows(batch, env.rank * LOCAL_BATCH, (env.rank + 1) * LOCAL_BATCH)
    all_ok = True
    for strategy in ("ddp", "fsdp"):
        model = parallelize(copy.deepcopy(reference), env, strategy)
        model.zero_grad(set_to_none=True)
        loss, grads = loss_and_gradients(model, objective, local, env.collectives)
        mean_loss = env.collectives.all_reduce_mean(loss)
        if env.rank == 0:
            failures = parity_failures(mean_loss, grads, expected_loss, expected, RTOL, ATOL)
            all_ok &= not failures
            report(f"siglip_locca {strategy} world={env.world_size}", mean_loss, expected_loss, len(expected),
                   failures)
    ok = env.collectives.broadcast_object(all_ok)
    shutdown_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
