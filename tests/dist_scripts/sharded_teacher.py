"""Run under torchrun (tests/test_distillation.py): a distillation teacher sharded with FSDP2 (dist.strategy=fsdp)
keeps only its share of the block weights on each rank and gives, on each rank's slice of a seeded global batch,
the unsharded fp32 teacher's image and text embeddings (1e-5); in bf16, sharded or not, it gives them within bf16's
precision and not bit for bit (the bf16 path ran). Rank 0 prints one line per check and the script exits non-zero
on any failure.

    torchrun --nproc_per_node=2 tests/dist_scripts/sharded_teacher.py TEACHER_DIR
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from contrastive.config import DistillationConfig, TeacherConfig
from contrastive.data.transforms import teacher_input
from contrastive.dist import init_distributed, shutdown_distributed
from contrastive.encoders import load_encoder
from contrastive.train.teachers import Teachers
from contrastive.types import Batch

LOCAL_BATCH = 3
BF16_ATOL = 1e-2  # bf16 keeps 8 bits of mantissa: the tiny test teacher's embeddings move by ~3e-3


def gathered(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def main() -> int:
    teacher_dir = sys.argv[1]
    env = init_distributed("cpu", "gloo")
    world, rank = env.world_size, env.rank
    reference = load_encoder(teacher_dir)
    size = reference.preprocess.image_size
    generator = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (world * LOCAL_BATCH, 3, size, size), dtype=torch.uint8, generator=generator)
    captions = [f"a photo of thing {i}" for i in range(world * LOCAL_BATCH)]
    with torch.no_grad():
        expected_images = reference.model.encode_image(teacher_input(pixels, reference.preprocess))
        expected_texts = reference.model.encode_text(reference.tokenizer(captions))
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    batch = Batch(images=torch.empty(LOCAL_BATCH, 0), tokens=torch.empty(LOCAL_BATCH, 0), teacher_images=pixels[rows],
                  captions=captions[rows])
    failures = []
    for strategy, precision in (("fsdp", "fp32"), ("fsdp", "bf16"), ("ddp", "bf16")):
        cfg = DistillationConfig(teachers=[TeacherConfig(name="t", path=teacher_dir)], contrastive_weight=1.0,
                                 feature_weight=1.0, precision=precision)
        teachers = Teachers(cfg, env, strategy)
        model = teachers.teachers[0].encoder.model
        sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
        local = sum(p.to_local().numel() for p in sharded)
        whole = sum(p.numel() for p in sharded)
        targets = teachers.targets(batch)["t"]
        images = gathered(targets.image_features, world)
        texts = gathered(targets.text_features, world)
        if rank != 0:
            continue
        image_diff = (images - expected_images).abs().max().item()
        text_diff = (texts - expected_texts).abs().max().item()
        # FSDP2 splits each parameter's first dimension over the ranks (rank 0's part rounded up)
        if strategy == "fsdp" and not (sharded and local * world <= whole * 1.25):
            failures.append(f"{strategy}/{precision}: {len(sharded)} sharded parameters, {local} of {whole} values "
                            "on rank 0")
        tolerance = 1e-5 if precision == "fp32" else BF16_ATOL
        if max(image_diff, text_diff) > tolerance:
            failures.append(f"{strategy}/{precision}: max abs diff {image_diff:.2e} (images), {text_diff:.2e} (texts)"
                            f" above {tolerance}")
        if precision == "bf16" and image_diff == 0:
            failures.append(f"{strategy}/{precision}: equals the fp32 teacher bit for bit: bf16 did not run")
        print(f"sharded teacher {strategy}/{precision} on {world} ranks: {local} of {whole} sharded values on "
              f"rank 0, max abs diff {image_diff:.2e} / {text_diff:.2e} against the unsharded fp32 teacher", flush=True)
    ok = env.collectives.broadcast_object(not failures)
    if rank == 0 and failures:
        print("FAIL " + "; ".join(failures), flush=True)
    shutdown_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
