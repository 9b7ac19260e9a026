"""SigLIP 2's image-text model with a LocCa decoder (Tschannen et al. 2025; Wan et al. 2024): the SigLIP two towers
plus CapPa's caption decoder cross-attending to every image patch token.

One image-tower pass gives both the pooled embedding the sigmoid loss scores and the patch tokens the decoder reads.
The decoder is contrastive.models.cappa's, run with teacher forcing only (LocCa's decoder is autoregressive), over
the decoder texts the data pipeline writes (contrastive.data.boxes: caption, referring and grounded-caption
prompts); prompt tokens are context, not targets. The image tower must be a timm ViT (SigLIP's towers are), whose
trunk gives its patch tokens before the attention-pool head. The towers stay loadable by open_clip under `clip.`,
so the image tower exports as any SigLIP's does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg

from contrastive.config import ModelConfig
from contrastive.errors import ConfigError
from contrastive.models.build import MODELS
from contrastive.models.cappa import IGNORE_INDEX, CaptionDecoder, decoder_config, shift_captions
from contrastive.models.towers import tower_configs
from contrastive.models.two_tower import TwoTowerModel
from contrastive.types import ModelOutput


def prompt_masked_targets(tokens: torch.Tensor, prompt_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs (B, L-1) and targets (B, L-1): the prompt's tokens (start token included) and padding are
    IGNORE_INDEX, so only the target text is scored."""
    inputs, targets = shift_captions(tokens)
    positions = torch.arange(1, tokens.shape[1], device=tokens.device)  # the token each target position predicts
    return inputs, targets.masked_fill(positions[None] < prompt_lengths[:, None], IGNORE_INDEX)


@MODELS.register("siglip_locca")
class SigLipLoccaModel(TwoTowerModel):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        _, vision, text = tower_configs(cfg)
        if not vision.get("timm_model_name") or not hasattr(self.clip.visual.trunk, "forward_head"):
            raise ConfigError("model.arch=siglip_locca needs a timm ViT image tower (model.vision.timm_model_name), "
                              "whose patch tokens the decoder reads")
        decoder = decoder_config(cfg.decoder)
        if decoder.parallel_prob != 0:
            raise ConfigError("model.decoder.parallel_prob must be 0 for model.arch=siglip_locca: LocCa's decoder "
                              "is trained with teacher forcing only")
        image_width = self.clip.visual.trunk.embed_dim
        self.decoder = CaptionDecoder(decoder, CLIPTextCfg(**text).vocab_size, self.context_length, image_width)

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, D): the trunk's patch tokens after its final norm, the memory the decoder cross-attends to."""
        return self.clip.visual.trunk.forward_features(images)

    def decode(self, image_tokens: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V); position t scores the token that follows inputs[:, t]."""
        teacher_forcing = torch.zeros(inputs.shape[0], dtype=torch.bool, device=inputs.device)
        return self.decoder(image_tokens, inputs, teacher_forcing)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, decoder_tokens: torch.Tensor | None = None,
                decoder_prompt_lengths: torch.Tensor | None = None) -> ModelOutput:
        """Without decoder texts (evaluation; the feature cache's first pass), the plain SigLIP outputs: the same
        image features, from the same trunk and head, as with them."""
        if decoder_tokens is None:
            return super().forward(images, tokens)
        visual = self.clip.visual
        image_tokens = visual.trunk.forward_features(images)  # (B, N, D)
        pooled = visual.head(visual.trunk.forward_head(image_tokens))  # (B, E), as visual(images) computes it
        inputs, targets = prompt_masked_targets(decoder_tokens, decoder_prompt_lengths)
        return ModelOutput(
            image_features=F.normalize(pooled.float(), dim=-1),
            text_features=self.encode_text(tokens),
            logit_scale=self.logit_scale(),
            logit_bias=self.clip.logit_bias,
            caption_logits=self.decode(image_tokens, inputs),
            caption_targets=targets,
        )
