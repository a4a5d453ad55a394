"""Benchmark suites of the incremental family (registered on import; ``edgetune.incremental.family`` imports this):
incremental (the few-shot class-incremental protocols), incremental-ncd (controllable forgetting),
incremental-speed (cost of adding a class and predicting), incremental-search (one-shot personal object search),
incremental-text (HOP, continual text learning), incremental-instances (object-conditioned bag of instances),
incremental-etf (transfer of backbones trained with a fixed ETF head)."""

from edgetune.incremental.bench import etf_transfer, fscil, instances, ncd, search, speed, text  # noqa: F401  (each module registers its suite)
