"""Benchmark suites of the merging family (registered on import; ``edgetune.merging.family`` imports this):
merging-tasks, merging-rebasin, merging-lora, merging-stream."""

from edgetune.merging.bench import lora, rebasin, stream, tasks  # noqa: F401  (each registers its suite)
