"""The text tokenizer: captions longer than the context are cut to fit and still end with the end-of-text token;
shorter ones are padded with zeros."""

from __future__ import annotations

from open_clip.tokenizer import SimpleTokenizer

from contrastive.config import ModelConfig
from contrastive.models import build_tokenizer

CONTEXT = 16


def test_long_captions_are_truncated_to_the_context_and_keep_their_end_token():
    tokenize = build_tokenizer(ModelConfig(embed_dim=32, text=dict(context_length=CONTEXT, vocab_size=49408,
                                                                   width=32, heads=2, layers=1)))
    bpe = SimpleTokenizer()
    start, end = bpe.encoder["<start_of_text>"], bpe.encoder["<end_of_text>"]
    long = "a photo of " + " and ".join(f"a red bag number {n}" for n in range(10))
    short = "a photo of a bag."
    tokens = tokenize([long, short])
    assert tuple(tokens.shape) == (2, CONTEXT)
    long_ids = bpe.encode(long)
    assert len(long_ids) > CONTEXT
    assert tokens[0].tolist() == [start, *long_ids[:CONTEXT - 2], end]
    short_ids = bpe.encode(short)
    assert tokens[1].tolist() == [start, *short_ids, end] + [0] * (CONTEXT - len(short_ids) - 2)
