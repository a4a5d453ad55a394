"""Few-shot class-incremental personalization: learn new classes from one or a few examples without forgetting.

Parts (one file each): moment pooling (:func:`moment_pool`), cosine prototypes with TEEN calibration, learnable
cosine and fixed simplex-ETF heads, novelty gates for controllable forgetting (NCD rules A-D) and their metrics
(FOR, NCR, NCR@kFOR), the :class:`IncrementalLearner` with its session runner, a bag-of-instances recognizer,
training-free personal object search, and continual text learning with moment pooling (HOP).
"""

from __future__ import annotations

from edgetune.incremental.pooling import check_orders, moment_pool

__all__ = ["check_orders", "moment_pool"]
