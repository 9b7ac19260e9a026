"""Text tokenizer for a model config: open_clip's BPE tokenizer (bundled, offline) or a locally cached HF one."""

from __future__ import annotations

from collections.abc import Callable

import open_clip
import torch
from open_clip.model import CLIPTextCfg

from contrastive.config import ModelConfig
from contrastive.errors import ConfigError
from contrastive.models.towers import tower_configs

Tokenizer = Callable[[list[str]], torch.Tensor]  # texts -> (N, context_length) int64


def build_tokenizer(cfg: ModelConfig) -> Tokenizer:
    text = CLIPTextCfg(**tower_configs(cfg)[2])
    hf_name = text.hf_tokenizer_name
    if not hf_name:
        return open_clip.SimpleTokenizer(context_length=text.context_length)
    try:
        return open_clip.HFTokenizer(hf_name, context_length=text.context_length, **(text.tokenizer_kwargs or {}))
    except OSError as error:
        raise ConfigError(
            f"tokenizer {hf_name!r} is not in the local Hugging Face cache and cannot be downloaded here; "
            f"set model.text.hf_tokenizer_name=null to use open_clip's bundled BPE tokenizer"
        ) from error
