"""Data: shard lists and splitting, the webdataset pipeline, transforms, tokenizer and the offline demo dataset."""
