"""Benchmark suites of the merging family (registered on import; ``edgetune.merging.family`` imports this)."""

from edgetune.merging.bench import tasks  # noqa: F401  (registers merging-tasks)
