"""`LoadedEncoder`: a model ready for inference with the preprocessing and tokenizer it expects, whatever format
it was read from. Evaluators, distillation teachers, data scoring and reports take this one value."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from contrastive.data.transforms import Preprocess

Tokenizer = Callable[[list[str]], torch.Tensor]  # texts -> (N, context_length) int64

KINDS = ("contrastive", "open_clip", "transformers")


@dataclass
class LoadedEncoder:
    """`model` is in eval mode on the requested device and has `encode_image(images, normalize=True) -> (B, D)`;
    where it has a text tower, also `encode_text(tokens, normalize=True) -> (B, D)`. Features are L2-normalised in
    fp32 by default, as ModelOutput's are. Captioners (CapPa, CoCa) also have `encode_image_tokens` and `decode`.
    """

    model: nn.Module
    preprocess: Preprocess
    tokenizer: Tokenizer | None  # None: an image-only export
    kind: str  # one of KINDS: which format the weights were read from
    name: str  # the model's name in result records (the run name, the open_clip config name, the directory name)
    source: str  # the file or directory the weights came from
    logit_scale: float | None = None  # exponentiated temperature, where the format keeps it
    logit_bias: float | None = None  # SigLIP's bias
    run_config: dict[str, Any] = field(default_factory=dict)  # our checkpoints: the run config, step, checkpoint

    @property
    def has_text_tower(self) -> bool:
        return self.tokenizer is not None and hasattr(self.model, "encode_text")


def parameter_value(module: nn.Module, name: str) -> float | None:
    """The value of the scalar parameter called `name` anywhere in `module` (logit_scale, logit_bias), or None."""
    found = [p for n, p in module.named_parameters() if n.rsplit(".", 1)[-1] == name]
    return float(found[0].detach().reshape(-1)[0]) if found else None


def weights_hash(model: nn.Module) -> str:
    """sha256 of every parameter and buffer of `model` (whole, not sharded): name, shape, dtype and bytes, in name
    order. Two encoders with the same hash compute the same function, whatever format they were read from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d tensors cannot be viewed as bytes
    return digest.hexdigest()
