"""Benchmark harness: suites yield rows of results data (quality, time, memory) stamped with the env."""

from edgetune.bench.harness import SUITES, BenchContext, append_rows_csv, register_suite, run_suite

__all__ = ["SUITES", "BenchContext", "append_rows_csv", "register_suite", "run_suite"]
