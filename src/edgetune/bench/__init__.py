"""Benchmark harness: suites yield rows of results data (quality, time, memory) stamped with the env.

Families register their suites (``edgetune.<family>.family`` imports them); :func:`run_suite` and
``edgetune ls suites`` load every family first.
"""

from edgetune.bench import suites as _suites  # noqa: F401  (registers the foundation suites)
from edgetune.bench.harness import SUITES, BenchContext, append_rows_csv, register_suite, run_suite

__all__ = ["SUITES", "BenchContext", "append_rows_csv", "register_suite", "run_suite"]
