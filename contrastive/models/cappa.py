"""CapPa (Tschannen et al. 2023): a ViT image encoder trained only by captioning, with parallel prediction.

The image encoder is open_clip's `VisionTransformer` (the tower we export), or a timm NaFlex tower
(contrastive.models.naflex) fed patch sequences; the caption decoder is ours: pre-LN blocks of self-attention,
cross-attention to every image patch token (the valid ones only, for NaFlex inputs) and an MLP, learned positions
and its own output layer.

Parallel prediction is a training-objective hyper-parameter (`loss.parallel_prob`), but it acts where the
decoder inputs are built, in this model's forward. So the model reads it from its own config,
`model.decoder.parallel_prob`, and the model configs interpolate that from `${loss.parallel_prob}`: the loss
config stays the one place to set it, the trainer needs no special case, and a checkpoint's resolved model config
records the value that was used. In training mode each example independently draws parallel prediction from
the model's generator (contrastive.models.randomness: seeded per rank by the trainer and checkpointed), so runs
and resumed runs are reproducible; in eval mode every example uses teacher forcing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_vision_tower
from torch import nn

from contrastive.config import ModelConfig, check_known_keys
from contrastive.errors import ConfigError
from contrastive.models.build import MODELS
from contrastive.models.naflex import encode_naflex, naflex_patch_size, naflex_trunk_tokens
from contrastive.models.randomness import ModelRandomness, draw_patch_dropout_from
from contrastive.models.towers import tower_configs
from contrastive.types import ModelOutput

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
PAD_ID = 0


@dataclass
class CaptionDecoderCfg:
    width: int = 512
    layers: int = 6
    heads: int = 8
    mlp_ratio: float = 4.0
    parallel_prob: float = 0.75  # the paper's share; model configs set it from ${loss.parallel_prob}


def decoder_config(values: dict) -> CaptionDecoderCfg:
    check_known_keys(values, CaptionDecoderCfg, "model.decoder")
    cfg = CaptionDecoderCfg(**values)
    if not 0.0 <= cfg.parallel_prob <= 1.0:
        raise ConfigError(f"model.decoder.parallel_prob must be within [0, 1], got {cfg.parallel_prob}")
    if cfg.width % cfg.heads:
        raise ConfigError(f"model.decoder.width={cfg.width} is not divisible by model.decoder.heads={cfg.heads}")
    return cfg


def shift_captions(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs (B, L-1) and next-token targets (B, L-1), padding targets set to IGNORE_INDEX."""
    targets = tokens[:, 1:].masked_fill(tokens[:, 1:] == PAD_ID, IGNORE_INDEX)
    return tokens[:, :-1], targets


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) attends to context (B, S, D); mask (B, 1, T, S) bool, True where attention is allowed."""
        batch, length, width = x.shape
        q = self.query(x).view(batch, length, self.heads, -1).transpose(1, 2)  # (B, H, T, D/H)
        k, v = self.key_value(context).view(batch, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D/H)
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    """Pre-LN: self-attention, cross-attention to the image tokens, MLP; each a residual branch."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.self_norm, self.self_attention = nn.LayerNorm(width), Attention(width, heads)
        self.cross_norm, self.cross_attention = nn.LayerNorm(width), Attention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, image_tokens: torch.Tensor, self_mask: torch.Tensor,
                cross_mask: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.self_norm(x)
        x = x + self.self_attention(normed, normed, self_mask)
        x = x + self.cross_attention(self.cross_norm(x), image_tokens, cross_mask)
        return x + self.mlp(self.mlp_norm(x))


class CaptionDecoder(nn.Module):
    """Next-token logits from caption tokens and image tokens, in teacher-forcing or parallel-prediction mode."""

    def __init__(self, cfg: CaptionDecoderCfg, vocab_size: int, max_length: int, image_width: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, cfg.width)
        self.mask_embedding = nn.Parameter(torch.zeros(cfg.width))  # the input of every parallel-mode position
        self.positional_embedding = nn.Parameter(torch.randn(max_length, cfg.width) * 0.02)
        self.image_projection = nn.Identity() if image_width == cfg.width else nn.Linear(image_width, cfg.width)
        self.blocks = nn.ModuleList(DecoderBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, vocab_size)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, image_tokens: torch.Tensor, inputs: torch.Tensor, parallel: torch.Tensor,
                image_valid: torch.Tensor | None = None) -> torch.Tensor:
        """image_tokens (B, N, Dv), inputs (B, T) token ids, parallel (B,) bool -> logits (B, T, V); image_valid
        (B, N) bool: the image tokens cross-attention may read (NaFlex padding is left out), None: all.

        A parallel example sees only the mask embedding at every position and attends fully; the others see
        their tokens under a causal mask, so position t depends on inputs[:, :t + 1] only.
        """
        length = inputs.shape[1]
        embedded = self.token_embedding(inputs)  # (B, T, D)
        # torch.where keeps both embeddings in the graph on every step (DDP expects a gradient for each).
        x = torch.where(parallel[:, None, None], self.mask_embedding.to(embedded.dtype), embedded)
        x = x + self.positional_embedding[:length]
        causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).tril()
        self_mask = (causal | parallel[:, None, None])[:, None]  # (B, 1, T, T)
        image_tokens = self.image_projection(image_tokens)
        cross_mask = None if image_valid is None else image_valid[:, None, None, :]  # (B, 1, 1, N)
        for block in self.blocks:
            x = block(x, image_tokens, self_mask, cross_mask)
        return self.head(self.norm(x))


@MODELS.register("cappa")
class CapPaModel(nn.Module):
    """Image encoder + caption decoder. `encode_image` gives the mean-pooled patch tokens (width = embed_dim)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.init_logit_bias is not None:  # it would be ignored: no sigmoid loss scores this model's pairs
            raise ConfigError("model.init_logit_bias is SigLIP's learnable bias; model.arch=cappa has none: "
                             "leave it null")
        embed_dim, vision, text = tower_configs(cfg)
        self.naflex = naflex_patch_size(vision.get("timm_model_name")) is not None
        if self.naflex:
            # timm's NaFlexVit pools by its own head (timm_pool avg: the mean of the valid patch tokens).
            self.visual = _build_vision_tower(embed_dim, CLIPVisionCfg(**vision), quick_gelu=cfg.quick_gelu)
            width = self.visual.trunk.embed_dim
            if embed_dim != width or list(self.visual.head):
                raise ConfigError(f"model.embed_dim={embed_dim} must equal the NaFlex tower's width {width}, with "
                                  f"model.vision.timm_proj=none: CapPa's image embedding is the pooled encoder output")
        else:
            vision = {**vision, "output_tokens": True}
            if vision.get("timm_model_name") or isinstance(vision.get("layers"), (list, tuple)):
                raise ConfigError("model.arch=cappa needs an open_clip ViT image tower or a timm naflexvit_* tower "
                                  "(no other timm or ResNet towers)")
            width = vision["width"]
            if embed_dim != width:
                raise ConfigError(f"model.embed_dim={embed_dim} must equal model.vision.width={width} for "
                                 f"CapPa: its image embedding is the pooled encoder output, with no projection")
            self.visual = _build_vision_tower(embed_dim, CLIPVisionCfg(**vision), quick_gelu=cfg.quick_gelu)
            self.visual.proj = None  # no contrastive head; a parameter without gradient would also stall DDP
        self.randomness = ModelRandomness()
        draw_patch_dropout_from(self.visual, self.randomness)
        decoder = decoder_config(cfg.decoder)
        self.parallel_prob = decoder.parallel_prob
        text_cfg = CLIPTextCfg(**text)
        self.context_length = text_cfg.context_length
        self.decoder = CaptionDecoder(decoder, text_cfg.vocab_size, self.context_length, width)
        self.embed_dim = embed_dim

    def encode_image(self, images: torch.Tensor, normalize: bool = True, patch_coord: torch.Tensor | None = None,
                     patch_valid: torch.Tensor | None = None) -> torch.Tensor:
        if patch_coord is not None:  # NaFlex: images are (B, N, P*P*3) patches
            pooled = encode_naflex(self.visual, images, patch_coord, patch_valid)
        else:
            pooled = self.visual(images) if self.naflex else self.visual(images)[0]  # (B, D)
        return F.normalize(pooled.float(), dim=-1) if normalize else pooled  # fp32, as in two_tower

    def encode_image_tokens(self, images: torch.Tensor, patch_coord: torch.Tensor | None = None,
                            patch_valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D): every patch token, the memory the decoder cross-attends to (with NaFlex patch inputs,
        padding positions too: decode takes the mask)."""
        if patch_coord is not None:
            return naflex_trunk_tokens(self.visual, images, patch_coord, patch_valid)
        return self.visual.trunk.forward_features(images) if self.naflex else self.visual(images)[1]

    def decode(self, image_tokens: torch.Tensor, inputs: torch.Tensor, parallel: bool | torch.Tensor = False,
               image_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V); position t scores the token that follows inputs[:, t]. image_valid (B, N): the image
        tokens to attend to (NaFlex), None: all."""
        if isinstance(parallel, bool):
            parallel = torch.full((inputs.shape[0],), parallel, dtype=torch.bool, device=inputs.device)
        return self.decoder(image_tokens, inputs, parallel, image_valid)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, patch_coord: torch.Tensor | None = None,
                patch_valid: torch.Tensor | None = None) -> ModelOutput:
        inputs, targets = shift_captions(tokens)
        parallel = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
        if self.training and self.parallel_prob > 0:
            draws = torch.rand(len(tokens), device=tokens.device, generator=self.randomness.generator)
            parallel = draws < self.parallel_prob
        logits = self.decode(self.encode_image_tokens(images, patch_coord, patch_valid), inputs, parallel, patch_valid)
        return ModelOutput(caption_logits=logits, caption_targets=targets)
