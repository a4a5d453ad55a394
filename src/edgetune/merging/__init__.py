"""Model merging: pure merge methods over state dicts of tensors (one file per method).

Each method file registers its :class:`Merger` and config in :data:`MERGERS`; :func:`merge` (alias of
:func:`merge_state_dicts`) checks the inputs and merges key by key::

    merged = merge([sd_a, sd_b], TiesConfig(density=0.2), base=sd_0)
"""

from __future__ import annotations

from edgetune.merging import (  # noqa: F401  (registration: each method file registers itself)
    breadcrumbs,
    dare,
    linear,
    model_stock,
    task_arithmetic,
    ties,
)
from edgetune.merging.base import Merger, merge, merge_state_dicts, merger_for
from edgetune.merging.breadcrumbs import BreadcrumbsConfig
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.dare import DareConfig
from edgetune.merging.linear import LinearConfig
from edgetune.merging.model_stock import ModelStockConfig
from edgetune.merging.task_arithmetic import TaskArithmeticConfig
from edgetune.merging.ties import TiesConfig

__all__ = ["MERGERS", "BreadcrumbsConfig", "DareConfig", "LinearConfig", "MergeConfig", "Merger", "ModelStockConfig",
           "TaskArithmeticConfig", "TiesConfig", "merge", "merge_state_dicts", "merger_for"]
