"""Connectors: documented output shapes, the 2x2 merge order, and exported encoder -> connector -> a tiny
randomly initialised transformers causal LM (inputs_embeds) through forward and backward."""

from __future__ import annotations

import pytest
import torch
import transformers

from contrastive.connectors import CONNECTORS, AttentionPooler, MLPProjector, PatchMerger, build_connector
from contrastive.export import EXPORT_FORMATS, load_vision_encoder
from tests.export_models import clip_style_config, randomized, siglip_style_config

LLM_DIM = 48


@pytest.mark.parametrize("name, options, tokens_out", [
    ("mlp", {}, 16),
    ("attention_pool", {"num_queries": 5, "num_heads": 4}, 5),
    ("patch_merger", {}, 4),
])
def test_connector_output_shapes(name, options, tokens_out):
    connector = build_connector(name, 32, LLM_DIM, **options)
    assert connector(torch.randn(3, 16, 32)).shape == (3, tokens_out, LLM_DIM)


def test_registry_names_the_three_designs_and_defaults_are_as_documented():
    assert CONNECTORS.names() == ["attention_pool", "mlp", "patch_merger"]
    assert AttentionPooler(32, LLM_DIM).queries.shape == (64, LLM_DIM)
    projector = MLPProjector(32, LLM_DIM)
    assert (projector.fc1.in_features, projector.fc1.out_features, projector.fc2.out_features) == (32, LLM_DIM, LLM_DIM)


def test_patch_merger_concatenates_each_2x2_neighbourhood():
    merger = PatchMerger(1, 4)
    merger.norm, merger.mlp = torch.nn.Identity(), torch.nn.Identity()  # the output is the merged vector itself
    grid = torch.arange(16.0).reshape(1, 16, 1)  # 4x4 grid, row-major
    merged = merger(grid)[0]
    assert merged.tolist()[0] == [0.0, 1.0, 4.0, 5.0] and merged.tolist()[3] == [10.0, 11.0, 14.0, 15.0]
    with pytest.raises(ValueError, match="square grid"):
        merger(torch.randn(1, 12, 1))


def tiny_causal_lm() -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=LLM_DIM, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("make_config", [clip_style_config, siglip_style_config], ids=["clip", "siglip"])
@pytest.mark.parametrize("name", ["mlp", "attention_pool", "patch_merger"])
def test_exported_encoder_feeds_a_causal_lm_forward_and_backward(tmp_path, make_config, name):
    EXPORT_FORMATS.get("bundle")(randomized(make_config()), tmp_path)
    encoder = load_vision_encoder(tmp_path)
    connector = build_connector(name, encoder.hidden_size, LLM_DIM,
                                **({"num_queries": 8} if name == "attention_pool" else {}))
    lm = tiny_causal_lm()
    images = torch.randn(2, 3, 28, 28)
    text = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        patch_tokens = encoder(images).patch_tokens  # (B, N, D_vision), frozen encoder as in LLaVA stage 1
    visual_embeds = connector(patch_tokens)  # (B, N', D_llm)
    inputs_embeds = torch.cat([visual_embeds, lm.get_input_embeddings()(text)], dim=1)
    labels = torch.cat([torch.full(visual_embeds.shape[:2], -100), text], dim=1)  # score text tokens only
    out = lm(inputs_embeds=inputs_embeds, labels=labels)
    assert out.logits.shape == (2, visual_embeds.shape[1] + 6, 100) and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in connector.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
