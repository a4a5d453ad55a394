"""Few-shot class-incremental personalization: learn new classes from one or a few examples without forgetting.

Parts (one file each): moment pooling (:func:`moment_pool`), cosine prototypes with TEEN calibration, learnable
cosine and fixed simplex-ETF heads, novelty gates for controllable forgetting (NCD rules A-D) and their metrics
(FOR, NCR, NCR@kFOR), the :class:`IncrementalLearner` with its session runner, a bag-of-instances recognizer,
training-free personal object search, and continual text learning with moment pooling (HOP).
"""

from __future__ import annotations

from edgetune.incremental.etf import etf_geometry_error, ideal_etf_gram, max_coherence, near_etf, simplex_etf
from edgetune.incremental.features import Backbone
from edgetune.incremental.heads import CosineHead, ETFHead, cosine_logits
from edgetune.incremental.learner import IncrementalLearner, LearnerConfig
from edgetune.incremental.pooling import check_orders, moment_pool
from edgetune.incremental.prototypes import class_sums, cosine_scores, prototypes_from_sums, teen_calibrate
from edgetune.incremental.sessions import run_sessions, summarize_sessions

__all__ = ["Backbone", "CosineHead", "ETFHead", "IncrementalLearner", "LearnerConfig", "check_orders", "class_sums",
           "cosine_logits", "cosine_scores", "etf_geometry_error", "ideal_etf_gram", "max_coherence", "moment_pool",
           "near_etf", "prototypes_from_sums", "run_sessions", "simplex_etf", "summarize_sessions", "teen_calibrate"]
