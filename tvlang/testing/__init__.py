"""Helpers for tests, benchmarks and examples: synthetic checkpoints (``synth``)."""
