"""Benchmarks: `python -m benchmarks.run` writes benchmarks/RESULTS.md and PNG plots."""
