"""Thin command-line entry points: parse arguments, build, run."""
