"""Few-shot class-incremental personalization: learn new classes from one or a few examples without forgetting.

Parts (one file each): moment pooling (:func:`moment_pool`), cosine prototypes with TEEN calibration, learnable
cosine and fixed simplex-ETF heads, novelty gates for controllable forgetting (NCD rules A-D) and their metrics
(FOR, NCR, NCR@kFOR), the :class:`IncrementalLearner` with its session runner, a bag-of-instances recognizer,
training-free personal object search, and continual text learning with moment pooling (HOP).
"""

from __future__ import annotations

from edgetune.incremental.etf import etf_geometry_error, ideal_etf_gram, max_coherence, near_etf, simplex_etf
from edgetune.incremental.features import Backbone
from edgetune.incremental.gates import GATES, NoveltyGateConfig, make_gate, unknown_mask
from edgetune.incremental.heads import CosineHead, ETFHead, cosine_logits
from edgetune.incremental.hop import HopConfig, HopModel
from edgetune.incremental.hop_pooling import content_mask, hop_features, select_problem
from edgetune.incremental.instances import (
    BagConfig,
    BagOfInstances,
    BagPrediction,
    bag_predict,
    region_moments,
)
from edgetune.incremental.learner import IncrementalLearner, LearnerConfig
from edgetune.incremental.metrics import (
    forgetting,
    ncr_at_for,
    novel_class_recall,
    operating_curve,
    performance_drop,
    session_accuracy,
)
from edgetune.incremental.ncd import ncd_protocol
from edgetune.incremental.object_search import PersonalObjectSearch, SearchConfig, SearchHit, search_metrics
from edgetune.incremental.patch_features import hf_vit_patches, mobilenet_v2_patches, vit_patches
from edgetune.incremental.pooling import check_orders, moment_pool
from edgetune.incremental.prototypes import class_sums, cosine_scores, prototypes_from_sums, teen_calibrate
from edgetune.incremental.sessions import evaluate_sessions, run_sessions, summarize_sessions
from edgetune.incremental.text_sequences import (
    SEQUENCES,
    Problem,
    SequenceConfig,
    TextSequence,
    build_sequence,
)

__all__ = ["GATES", "SEQUENCES", "Backbone", "BagConfig", "BagOfInstances", "BagPrediction", "CosineHead",
           "ETFHead", "HopConfig", "HopModel", "IncrementalLearner", "LearnerConfig", "NoveltyGateConfig",
           "PersonalObjectSearch", "Problem", "SearchConfig", "SearchHit", "SequenceConfig", "TextSequence",
           "bag_predict", "build_sequence", "check_orders", "class_sums", "content_mask", "cosine_logits",
           "cosine_scores", "etf_geometry_error", "evaluate_sessions", "forgetting", "hf_vit_patches",
           "hop_features", "ideal_etf_gram", "make_gate", "max_coherence", "mobilenet_v2_patches",
           "moment_pool", "ncd_protocol", "ncr_at_for", "near_etf", "novel_class_recall", "operating_curve",
           "performance_drop", "prototypes_from_sums", "region_moments", "run_sessions", "search_metrics",
           "select_problem", "session_accuracy", "simplex_etf", "summarize_sessions", "teen_calibrate",
           "unknown_mask", "vit_patches"]
