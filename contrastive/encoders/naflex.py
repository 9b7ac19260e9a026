"""A NaFlex encoder evaluated at one sequence length (contrastive-eval --seq-len): every image keeps its aspect ratio
and is resized to the largest patch grid within that many patches, as in training."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from contrastive.data.naflex import split_eval_rows
from contrastive.encoders.encoder import LoadedEncoder
from contrastive.errors import ConfigError


@dataclass
class NaFlexEncoderOutput:
    """What a NaFlex image encoder gives a connector (export.bundle.VisionEncoder.forward_naflex, and
    Siglip2VisionModel directories through load_encoder)."""

    patch_tokens: list[torch.Tensor]  # per image (rows, columns, D): its valid patch tokens of the chosen layer
    pooled: torch.Tensor  # (B, E): the attention-pool head's output over the valid patches


class NaFlexAtLength(nn.Module):
    """The encoder's model, taking naflex.NaFlexEvalRows batches (B, N, P*P*3 + 3) as its images."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def encode_image(self, rows: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        batch = split_eval_rows(rows)
        return self.model.encode_image(batch.patches, normalize=normalize, patch_coord=batch.coord,
                                       patch_valid=batch.valid)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)


def at_seq_len(encoder: LoadedEncoder, seq_len: int) -> LoadedEncoder:
    """`encoder` with images preprocessed and encoded as NaFlex patch sequences of `seq_len` patches."""
    if encoder.preprocess.patch_size is None:
        raise ConfigError(f"--seq-len needs a NaFlex checkpoint (a naflexvit_* image tower); {encoder.source} "
                          f"takes fixed-size images")
    if seq_len <= 0:
        raise ConfigError(f"--seq-len values must be positive patch counts, got {seq_len}")
    return replace(encoder, model=NaFlexAtLength(encoder.model),
                   preprocess=replace(encoder.preprocess, seq_len=seq_len))
