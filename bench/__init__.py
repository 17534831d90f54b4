"""Benchmark sweeps (pytest-benchmark); see bench/README section of the top-level README."""
