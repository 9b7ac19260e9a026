"""One way to load any encoder for inference: `load_encoder(path)` reads a checkpoint of ours (file or run
directory), an open_clip directory or model name plus weights, or a transformers directory, and returns a
`LoadedEncoder`: the model with encode_image (and encode_text), its preprocessing, tokenizer and logit scale.

    encoder = load_encoder("runs/demo")                            # our newest checkpoint
    encoder = load_encoder("export/open_clip")                     # open_clip_config.json + weights
    encoder = load_encoder("weights/vit_b_32.pt", open_clip_name="ViT-B-32")
    encoder = load_encoder("export/hf")                            # config.json (CLIPVisionModel, SiglipModel, ...)
    features = encoder.model.encode_image(encoder.preprocess.transform()(image)[None])  # (1, D), normalised

It sits above models/ and data/ (it joins a model with its preprocessing) and below train/, eval/ and export/.
"""

from contrastive.encoders.encoder import KINDS, LoadedEncoder, Tokenizer, weights_hash
from contrastive.encoders.loading import detect_kind, load_encoder
from contrastive.encoders.ours import encoder_from_model, preprocess_from_config

__all__ = ["KINDS", "LoadedEncoder", "Tokenizer", "detect_kind", "encoder_from_model", "load_encoder",
           "preprocess_from_config", "weights_hash"]
