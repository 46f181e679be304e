"""Benchmark our shard jobs against NeMo Automodel's `precompute_eagle3`: `python -m tools.benchmark --help`."""
