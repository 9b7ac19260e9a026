"""Text tokenizer for a model config: open_clip's BPE tokenizer (bundled, offline) or a locally cached HF one."""

from __future__ import annotations

from collections.abc import Callable

import open_clip
import torch

from contrastive.config import ModelConfig
from contrastive.models.registry import tower_configs
from contrastive.errors import ConfigError

Tokenizer = Callable[[list[str]], torch.Tensor]  # texts -> (N, context_length) int64


def build_tokenizer(cfg: ModelConfig) -> Tokenizer:
    _, _, text = tower_configs(cfg)
    context_length = text.get("context_length", 77)
    hf_name = text.get("hf_tokenizer_name")
    if not hf_name:
        return open_clip.SimpleTokenizer(context_length=context_length)
    try:
        return open_clip.HFTokenizer(hf_name, context_length=context_length, **(text.get("tokenizer_kwargs") or {}))
    except OSError as error:
        raise ConfigError(
            f"tokenizer {hf_name!r} is not in the local Hugging Face cache and cannot be downloaded here; "
            f"set model.text.hf_tokenizer_name=null to use open_clip's bundled BPE tokenizer"
        ) from error
