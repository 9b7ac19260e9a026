"""Run under torchrun: loss=siglip on a tiny NaFlex SigLIP (model=tiny_naflex_siglip), each rank on its slice of a
seeded global batch of padded patch sequences (several aspect ratios, one sequence length), wrapped for FSDP2 with
and without activation checkpointing; rank 0 checks the loss and every parameter's gradient against the same model
run in one process on the whole batch. Prints one line per setting and exits non-zero on any mismatch.

    torchrun --nproc_per_node=2 tests/dist_scripts/naflex_parity.py
"""

from __future__ import annotations

import copy
import sys

import torch
from PIL import Image

from contrastive.data.naflex import NaFlexResize, PatchNormalize, pack
from contrastive.dist import LocalCollectives, init_distributed, shutdown_distributed
from contrastive.dist.parallel import parallelize
from contrastive.losses import build_loss
from contrastive.models import build_model
from contrastive.types import Batch
from tests.conftest import compose_config
from tests.dist_scripts.parity import full_gradients, parity_failures, report

RTOL, ATOL = 1e-4, 1e-6  # fp32; the reductions differ in order from the one-process sums
LOCAL_BATCH = 3
SEQ_LEN = 36


def global_batch(world: int) -> Batch:
    size = world * LOCAL_BATCH
    resize = NaFlexResize(7, "bilinear")
    generator = torch.Generator().manual_seed(3)
    photos = [Image.fromarray(torch.randint(0, 256, (15 + 11 * index, 80 - 9 * index, 3), generator=generator,
                                            dtype=torch.uint8).numpy()) for index in range(size)]
    packed = pack([resize(photo, max_patches=SEQ_LEN) for photo in photos], SEQ_LEN)
    assert not packed.valid.all()  # some images are padded
    tokens = torch.randint(1, 1000, (size, 16), generator=torch.Generator().manual_seed(7))
    tokens[:, 10:] = 0
    return Batch(images=PatchNormalize([0.5] * 3, [0.5] * 3, 7)(packed.patches, packed.valid), tokens=tokens,
                 patch_coord=packed.coord, patch_valid=packed.valid)


def rows(batch: Batch, start: int, stop: int) -> Batch:
    return Batch(images=batch.images[start:stop], tokens=batch.tokens[start:stop],
                 patch_coord=batch.patch_coord[start:stop], patch_valid=batch.patch_valid[start:stop])


def loss_and_gradients(model, objective, batch: Batch, collectives) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    output = model(batch.images, batch.tokens, patch_coord=batch.patch_coord, patch_valid=batch.patch_valid)
    loss = objective(output, batch, collectives).loss
    loss.backward()
    return loss.detach(), full_gradients(model)


def main() -> int:
    env = init_distributed("cpu", "gloo")
    cfg = compose_config(["model=tiny_naflex_siglip", "loss=siglip"])
    torch.manual_seed(0)
    reference = build_model(cfg.model)
    objective = build_loss(cfg.loss)
    batch = global_batch(env.world_size)
    expected_loss, expected = loss_and_gradients(reference, objective, batch, LocalCollectives())
    local = rows(batch, env.rank * LOCAL_BATCH, (env.rank + 1) * LOCAL_BATCH)
    all_ok = True
    for checkpointing in (False, True):
        model = parallelize(copy.deepcopy(reference), env, "fsdp", activation_checkpointing=checkpointing)
        loss, grads = loss_and_gradients(model, objective, local, env.collectives)
        mean_loss = env.collectives.all_reduce_mean(loss)
        if env.rank == 0:
            failures = parity_failures(mean_loss, grads, expected_loss, expected, RTOL, ATOL)
            all_ok &= not failures
            report(f"naflex siglip fsdp activation_checkpointing={checkpointing} world={env.world_size}", mean_loss,
                   expected_loss, len(expected), failures)
    ok = env.collectives.broadcast_object(all_ok)
    shutdown_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
