"""Model merging: pure merge methods over state dicts of tensors (one file per method).

Each method file registers its :class:`Merger` and config in :data:`MERGERS`; :func:`merge` (alias of
:func:`merge_state_dicts`) checks the inputs and merges key by key::

    merged = merge([sd_a, sd_b], TiesConfig(density=0.2), base=sd_0)

On files (safetensors, Hugging Face folders, edgetune run folders), :func:`stream_merge` merges tensor by tensor
without holding whole models, and :func:`load_job` / :func:`run_merge` run an ``edgetune merge`` job file (or a
mergekit YAML). LoRA adapters of one base merge as factors: :func:`lora_linear`, :func:`lora_concat`,
:func:`lora_svd`, :func:`ziplora` (learned per-column coefficients) and LoRA.rar (:func:`train_lorarar` once, then
:func:`lorarar_merge` in one forward pass per pair).
"""

from __future__ import annotations

from edgetune.merging import (  # noqa: F401  (registration: each method file registers itself)
    adamerging,
    breadcrumbs,
    dare,
    fisher,
    linear,
    model_stock,
    rebasin,
    regmean,
    safety,
    task_arithmetic,
    ties,
)
from edgetune.merging.adamerging import AdaMergingConfig
from edgetune.merging.base import Merger, check_inputs, check_options, merge, merge_state_dicts, merger_for
from edgetune.merging.breadcrumbs import BreadcrumbsConfig
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.merging.dare import DareConfig
from edgetune.merging.data_aware import merge_with_data
from edgetune.merging.fisher import FisherConfig, fisher_diagonal, fisher_merge
from edgetune.merging.job import MergeJob, check_job, load_job, run_merge
from edgetune.merging.linear import LinearConfig
from edgetune.merging.lora_merge import lora_concat, lora_linear, lora_svd, read_loras, save_lora
from edgetune.merging.lorarar import LoraRarConfig, load_lorarar, lorarar_merge, save_lorarar, train_lorarar
from edgetune.merging.model_stock import ModelStockConfig
from edgetune.merging.rebasin import (
    RebasinConfig,
    apply_permutation,
    interpolation_barrier,
    rebasin_align,
    spec_from_model,
    weight_matching,
)
from edgetune.merging.regmean import RegMeanConfig, gram_matrices, regmean_merge
from edgetune.merging.safety import SafetyConfig, must_keep_from_reference, safety_merge
from edgetune.merging.sources import TensorSource, check_compatible, open_source
from edgetune.merging.stream import StreamReport, read_once_seconds, stream_merge
from edgetune.merging.task_arithmetic import TaskArithmeticConfig
from edgetune.merging.ties import TiesConfig
from edgetune.merging.ziplora import ZipLoraConfig, ziplora

__all__ = ["MERGERS", "AdaMergingConfig", "BreadcrumbsConfig", "DareConfig", "FisherConfig", "LinearConfig",
           "LoraRarConfig", "MergeConfig", "MergeJob", "Merger", "ModelStockConfig",
           "RebasinConfig", "RegMeanConfig", "SafetyConfig", "StreamReport", "TaskArithmeticConfig",
           "TensorSource", "TiesConfig", "ZipLoraConfig", "apply_permutation", "check_compatible",
           "check_inputs", "check_job", "check_options", "fisher_diagonal", "fisher_merge", "gram_matrices",
           "interpolation_barrier", "load_job", "load_lorarar", "lora_concat", "lora_linear", "lora_svd",
           "lorarar_merge", "merge", "merge_state_dicts", "merge_with_data", "merger_for",
           "must_keep_from_reference", "open_source", "read_loras", "read_once_seconds", "rebasin_align",
           "regmean_merge", "run_merge", "safety_merge", "save_lora", "save_lorarar", "spec_from_model",
           "stream_merge", "train_lorarar", "weight_matching", "ziplora"]
