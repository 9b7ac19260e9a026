"""Evaluators: zero-shot classification (and, as they come, retrieval and linear probes). Each has run() -> metrics."""
