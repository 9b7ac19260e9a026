"""Training: the trainer, optimiser and schedule, checkpoints, metric logging."""
