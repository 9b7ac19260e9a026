"""The two sides benchmarks/train_step.py times, one per process: ours and open_clip_train's loop body.

    python benchmarks/train_step_contenders.py --contender ours --config conf/model/tiny_clip.yaml --batch-size 128

train_step.py starts this script once per contender and process and talks to it over stdin/stdout: after
"ready", each line it reads ("step", "memory" or "flops") is answered with one number (seconds, peak bytes, model
FLOPs per sample). The models, their weights and the loss and optimiser libraries live only here, so the
process that orchestrates the timing stays light.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import open_clip
import torch
from devices import DEVICES, PRECISIONS, autocast, benchmark_device, peak_memory_bytes, timed
from omegaconf import OmegaConf
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip_train.precision import get_autocast
from open_clip_train.scheduler import cosine_lr

from contrastive.config import LossConfig, ModelConfig, OptimConfig
from contrastive.dist.collectives import LocalCollectives
from contrastive.losses import build_loss
from contrastive.models import build_model
from contrastive.models.towers import model_image_size, tower_configs
from contrastive.train.flops import flops_per_sample
from contrastive.train.host_memory import reuse_freed_host_memory
from contrastive.train.optim import build_optimizer, build_scheduler, optimizer_step
from contrastive.train.step import build_forward_backward
from contrastive.types import Batch

STEPS = 1000  # schedule length; only the lr value changes with it
GLIBC_MEMORY = "glibc_memory"  # contender-name suffix: glibc's default host-memory handling, not Trainer's


@dataclass
class Contender:
    step: Callable[[], None]
    count_flops: Callable[[], float] | None = None  # ours only: model FLOPs per sample


def model_config(path: str) -> ModelConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))


def random_batch(model_cfg: ModelConfig, batch_size: int) -> Batch:
    text = CLIPTextCfg(**tower_configs(model_cfg)[2])
    size, length = model_image_size(model_cfg), text.context_length
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, text.vocab_size, (batch_size, length), generator=generator)
    tokens[:, length // 2:] = 0
    return Batch(images=torch.randn(batch_size, 3, size, size, generator=generator), tokens=tokens)


def ours(model_cfg: ModelConfig, batch: Batch, precision: str, variant: str | None,
         device: torch.device) -> Contender:
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)
    model.randomness.place(device, 0)  # as Trainer does: random parts draw on the model's device
    optim_cfg = OptimConfig()  # conf/optim/adamw.yaml's values are the schema defaults
    if variant in ("foreach", "for_loop"):
        optim_cfg.implementation = variant
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        batch = Batch(images=batch.images.contiguous(memory_format=torch.channels_last), tokens=batch.tokens)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, STEPS)
    forward_model = torch.compile(model) if variant == "compile" else model
    objective = build_loss(LossConfig(name="clip"))
    amp = autocast(device, precision)
    forward_backward = build_forward_backward(forward_model, objective, LocalCollectives(device), 1, amp,
                                              randomness=model.randomness)

    def step() -> None:
        forward_backward(batch)
        optimizer_step(model.parameters(), optimizer, optim_cfg.grad_clip_norm)
        scheduler.step()

    return Contender(step, lambda: flops_per_sample(model, objective, batch, autocast=amp))


def open_clip_step(model_cfg: ModelConfig, batch: Batch, precision: str, weights: dict,
                   device: torch.device) -> Contender:
    embed_dim, vision, text = tower_configs(model_cfg)
    model = open_clip.CLIP(embed_dim, CLIPVisionCfg(**vision), CLIPTextCfg(**text), quick_gelu=model_cfg.quick_gelu,
                           output_dict=True)
    model.load_state_dict(weights)
    model.to(device)
    model.train()
    # open_clip_train.main's parameter groups and AdamW arguments
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    defaults = OptimConfig()
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad],
          "weight_decay": defaults.weight_decay}],
        lr=defaults.lr, betas=tuple(defaults.betas), eps=defaults.eps,
    )
    scheduler = cosine_lr(optimizer, defaults.lr, defaults.warmup_steps, STEPS)
    loss = open_clip.ClipLoss()
    amp = get_autocast("amp_bf16" if precision == "bf16" else "fp32", device_type=device.type)
    counter = iter(range(10**9))

    def step() -> None:
        scheduler(next(counter))
        optimizer.zero_grad()
        with amp():
            losses = loss(**model(batch.images, batch.tokens), output_dict=True)
            total_loss = sum(losses.values())
        total_loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return Contender(step)


def build_contender(name: str, config: str, batch_size: int, precision: str, device: torch.device) -> Contender:
    model_cfg = model_config(config)
    batch = random_batch(model_cfg, batch_size).to(device)
    if name.startswith("open_clip"):
        torch.manual_seed(0)
        return open_clip_step(model_cfg, batch, precision, build_model(model_cfg).clip.state_dict(), device)
    return ours(model_cfg, batch, precision, name.removeprefix("ours_") if name != "ours" else None, device)


def serve(args: argparse.Namespace) -> None:
    """Build one contender, then answer one request per line read from stdin."""
    torch.set_num_threads(args.threads)
    device = benchmark_device(args.device)
    if device.type == "cpu" and not args.contender.endswith(GLIBC_MEMORY):
        # Trainer's CPU default, given to every contender alike (open_clip too), before anything large is allocated.
        reuse_freed_host_memory()
    contender = build_contender(args.contender, args.config, args.batch_size, args.precision, device)
    answers = {
        "step": lambda: timed(contender.step, device),
        "memory": lambda: peak_memory_bytes(device),
        "flops": contender.count_flops,
    }
    print("ready", flush=True)
    for request in sys.stdin:
        print(answers[request.strip()](), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", required=True,
                        help="ours, ours_VARIANT (see train_step.py) or open_clip; a _glibc_memory suffix keeps "
                             "glibc's default host-memory handling instead of Trainer's reuse_freed_host_memory")
    parser.add_argument("--config", required=True, help="a conf/model/ file")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--device", default="cpu", choices=DEVICES)
    parser.add_argument("--threads", type=int, default=2)
    serve(parser.parse_args())


if __name__ == "__main__":
    main()
