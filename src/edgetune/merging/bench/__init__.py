"""Benchmark suites of the merging family (registered on import; ``edgetune.merging.family`` imports this):
merging-tasks, merging-rebasin, merging-lora, merging-stream, merging-llm-safety."""

from edgetune.merging.bench import llm_safety, lora, rebasin, stream, tasks  # noqa: F401  (each registers its suite)
