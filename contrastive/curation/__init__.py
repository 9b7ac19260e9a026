"""Data curation over img2dataset shards: scoring with a trained encoder, filtering, deduplication and MetaCLIP
balancing. Sits beside train/ and eval/: it reads shards (data) and encoders, never the trainer or the CLI."""
