"""Benchmark suites of the adapters family (registered on import by the family plug-in)."""

from edgetune.adapters.bench import convergence, speed  # noqa: F401  (register adapters-convergence, adapters-speed)
