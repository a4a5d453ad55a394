"""Benchmark harness: suites yield rows of results data (quality, time, memory) stamped with the env."""

from edgetune.bench import sparse_quality as _sparse_quality  # noqa: F401  (registers its suite)
from edgetune.bench import sparse_suite as _sparse_suite  # noqa: F401  (registers its suite)
from edgetune.bench.harness import SUITES, BenchContext, append_rows_csv, register_suite, run_suite

__all__ = ["SUITES", "BenchContext", "append_rows_csv", "register_suite", "run_suite"]
