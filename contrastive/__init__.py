"""Contrastive image-text pretraining: CLIP, SigLIP, CapPa and CoCa with torchrun, Hydra and webdataset."""
