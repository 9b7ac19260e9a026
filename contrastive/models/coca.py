"""CoCa (Yu et al. 2022): contrastive + captioning, with open_clip's `CoCa` as the model.

open_clip's layout: the image tower ends in an attentional pooler whose first query gives the contrastive image
embedding and whose other queries are the tokens the multimodal decoder cross-attends to; a unimodal causal text
tower with an appended CLS token gives the contrastive text embedding and the token states the multimodal decoder
continues from. The state dict stays loadable by open_clip under `coca.`.

With a timm NaFlex trunk (model.vision.timm_model_name naflexvit_*, contrastive.models.naflex), open_clip's CoCa
has no attentional pooler to offer, so `NaFlexAttentionalPooling` puts one of open_clip's `AttentionalPooler`s, its
final norm and projection after the trunk, in open_clip's original CoCa order (pool, norm, first query for the
contrastive embedding, the rest for the decoder). The pooler reads the valid patches only; the decoder reads the
pooler's tokens, so it never sees padding either. Such a model has no open_clip counterpart to load it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.coca_model import CoCa, MultimodalCfg
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.timm_model import TimmModel
from open_clip.transformer import AttentionalPooler, LayerNorm
from torch import nn

from contrastive.config import ModelConfig, check_known_keys
from contrastive.errors import ConfigError
from contrastive.models.build import MODELS
from contrastive.models.cappa import shift_captions
from contrastive.models.naflex import naflex_patch_size, naflex_trunk_tokens
from contrastive.models.randomness import ModelRandomness, draw_patch_dropout_from
from contrastive.models.towers import tower_configs
from contrastive.models.two_tower import capped_logit_scale
from contrastive.types import ModelOutput


def multimodal_config(decoder: dict, text: CLIPTextCfg, embed_dim: int) -> MultimodalCfg:
    check_known_keys(decoder, MultimodalCfg, "model.decoder")
    values = {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": embed_dim, **decoder}
    if values["width"] != embed_dim:
        raise ConfigError(f"model.decoder.width={values['width']} must equal model.embed_dim={embed_dim}: "
                         f"open_clip's CoCa decoder cross-attends to the attentional pooler's {embed_dim}-d tokens")
    if text.width != values["width"]:
        raise ConfigError(f"model.text.width={text.width} must equal model.decoder.width={values['width']}: "
                         f"the multimodal decoder continues from the text tower's token states")
    return MultimodalCfg(**values)


class NaFlexAttentionalPooling(nn.Module):
    """A timm NaFlex tower's trunk, then CoCa's attentional pooling of its valid patch tokens: (pooled (B, E),
    decoder tokens (B, Q-1, E)), as open_clip's CoCa image tower returns them."""

    def __init__(self, tower: TimmModel, embed_dim: int, vision: CLIPVisionCfg) -> None:
        super().__init__()
        self.tower = tower
        width = tower.trunk.embed_dim
        self.attn_pool = AttentionalPooler(embed_dim, width, n_head=vision.attn_pooler_heads,
                                           n_queries=vision.attn_pooler_queries)
        self.ln_post = LayerNorm(embed_dim)
        self.proj = nn.Parameter(width**-0.5 * torch.randn(embed_dim, embed_dim))  # open_clip's initial scale

    def forward(self, images: torch.Tensor, patch_coord: torch.Tensor | None = None,
                patch_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), or NaFlex patches (B, N, P*P*3) with patch_coord (B, N, 2) and patch_valid (B, N)."""
        if patch_coord is None:
            tokens = self.tower.trunk.forward_features(images)  # (B, N, W), every patch real
        else:
            tokens = naflex_trunk_tokens(self.tower, images, patch_coord, patch_valid)  # (B, N, W), padding too
        pooler = self.attn_pool
        keys = pooler.ln_k(tokens)
        queries = pooler.ln_q(pooler.query).unsqueeze(0).expand(len(tokens), -1, -1)  # (B, Q, E)
        # key_padding_mask is True where a key is ignored: padding gets zero weight, so no value and no gradient.
        padding = None if patch_valid is None else ~patch_valid
        pooled = pooler.attn(queries, keys, keys, key_padding_mask=padding, need_weights=False)[0]  # (B, Q, E)
        pooled = self.ln_post(pooled)
        return pooled[:, 0] @ self.proj, pooled[:, 1:]


@MODELS.register("coca")
class CoCaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.init_logit_bias is not None:  # it would be ignored: no sigmoid loss scores this model's pairs
            raise ConfigError("model.init_logit_bias is SigLIP's learnable bias; model.arch=coca has none: "
                             "leave it null")
        embed_dim, vision, text = tower_configs(cfg)
        naflex = naflex_patch_size(vision.get("timm_model_name")) is not None
        if vision.get("timm_model_name") and not naflex:
            raise ConfigError("model.arch=coca needs an open_clip ViT image tower (its attentional pooler) or a timm "
                              "naflexvit_* tower")
        if naflex and (vision.get("timm_proj") != "none" or vision.get("timm_pool") != ""):
            raise ConfigError("model.arch=coca on a NaFlex tower needs model.vision.timm_proj=none and timm_pool='': "
                              "the attentional pooler after the trunk pools and projects instead")
        # What makes the towers CoCa's: pooled + token outputs from both, an attention-pooled image, a text CLS.
        vision = {**vision, "attentional_pool": True, "output_tokens": True}
        text_cfg = CLIPTextCfg(**{**text, "embed_cls": True, "output_tokens": True})
        self.coca = CoCa(
            embed_dim,
            multimodal_config(cfg.decoder, text_cfg, embed_dim),
            text_cfg,
            CLIPVisionCfg(**vision),
            quick_gelu=cfg.quick_gelu,
            init_logit_scale=cfg.init_logit_scale,
        )
        if naflex:  # open_clip built the bare timm tower; CoCa's pooling goes after it
            self.coca.visual = NaFlexAttentionalPooling(self.coca.visual, embed_dim, CLIPVisionCfg(**vision))
        # open_clip leaves the decoder's output projection as torch.empty (its init routine is never called).
        decoder_width = self.coca.text_decoder.width
        nn.init.normal_(self.coca.text_decoder.text_projection, std=decoder_width**-0.5)
        self.randomness = ModelRandomness()
        draw_patch_dropout_from(self.coca.visual, self.randomness)
        self.embed_dim = embed_dim
        self.context_length = text_cfg.context_length

    @property
    def visual(self) -> nn.Module:
        return self.coca.visual

    def encode_image(self, images: torch.Tensor, normalize: bool = True, patch_coord: torch.Tensor | None = None,
                     patch_valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D); NaFlex towers also take patch sequences (contrastive.models.naflex)."""
        pooled = self._visual(images, patch_coord, patch_valid)[0]
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.coca.encode_text(tokens, normalize=normalize)  # (B, D)

    def encode_image_tokens(self, images: torch.Tensor, patch_coord: torch.Tensor | None = None,
                            patch_valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Q-1, D): the attentional pooler's captioning tokens, the memory the decoder cross-attends to."""
        return self._visual(images, patch_coord, patch_valid)[1]

    def _visual(self, images: torch.Tensor, patch_coord: torch.Tensor | None,
                patch_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if patch_coord is None:
            return self.coca.visual(images)
        return self.coca.visual(images, patch_coord, patch_valid)

    def decode(self, image_tokens: torch.Tensor, inputs: torch.Tensor, parallel: bool = False) -> torch.Tensor:
        """Logits (B, T, V); position t scores the token that follows inputs[:, t] (teacher forcing only)."""
        if parallel is not False:
            raise ValueError("CoCa's decoder is autoregressive only; parallel decoding is a CapPa feature")
        _, token_states = self.coca.text(inputs)  # (B, T, W), causal
        return self.coca.text_decoder(image_tokens, token_states)

    def logit_scale(self) -> torch.Tensor:
        return capped_logit_scale(self.coca.logit_scale, self.cfg.max_logit_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, patch_coord: torch.Tensor | None = None,
                patch_valid: torch.Tensor | None = None) -> ModelOutput:
        image_features, image_tokens = self._visual(images, patch_coord, patch_valid)
        text_features, token_states = self.coca.text(tokens)
        # The text tower's states at positions 0..L-2 predict tokens 1..L-1 (the CLS state is not among them).
        _, targets = shift_captions(tokens)
        logits = self.coca.text_decoder(image_tokens, token_states[:, :-1])  # (B, L-1, V)
        return ModelOutput(
            image_features=F.normalize(image_features.float(), dim=-1),  # fp32, as in two_tower
            text_features=F.normalize(text_features.float(), dim=-1),
            logit_scale=self.logit_scale(),
            caption_logits=logits,
            caption_targets=targets,
        )
