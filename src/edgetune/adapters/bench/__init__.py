"""Benchmark suites of the adapters family (registered on import by the family plug-in)."""

from edgetune.adapters.bench import convergence  # noqa: F401  (registers adapters-convergence)
