"""Benchmark suites of the incremental family (registered on import; ``edgetune.incremental.family`` imports this):
incremental (the few-shot class-incremental protocols)."""

from edgetune.incremental.bench import fscil, ncd, speed  # noqa: F401  (each module registers its suite)
