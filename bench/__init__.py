"""Benchmark sweeps (pytest-benchmark); their results and the commands behind them: docs/results.md."""
