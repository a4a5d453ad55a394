"""Sparse family: dynamic sparse training (static, SET, RigL, CHT, CHTs, CHTss) on real sparse layers.

``sparsify_(model, SparseConfig(method="chts", density=0.01))`` swaps the selected ``nn.Linear`` layers for
:class:`SparseLinear` (weights, gradients and optimizer state in proportion to the links);
``SparseEngine(model, cfg)`` is the training-loop callback that evolves the topology. In a recipe, the
``sparse:`` section does both. The rules (removal, regrowth, initial topology, weight init, density
schedule) are registered by name in :mod:`edgetune.sparse.strategies`; a new rule is one file there.
"""

from __future__ import annotations

from torch import nn

from edgetune.core.hooks import Callback
from edgetune.core.sections import SectionContext, register_section
from edgetune.sparse.config import SparseConfig
from edgetune.sparse.engine import SparseEngine, active_neuron_fraction
from edgetune.sparse.layer import SparseLinear, remap_optimizer_state
from edgetune.sparse.methods import SPARSE_METHODS
from edgetune.sparse.predictors import link_scores, sample_without_replacement
from edgetune.sparse.sparsify import layer_chains, sparse_layers, sparsify_
from edgetune.sparse.strategies import (
    DENSITY_SCHEDULES,
    REGROWTHS,
    REMOVALS,
    TOPOLOGIES,
    WEIGHT_INITS,
    load_rules,
)

__all__ = [
    "DENSITY_SCHEDULES",
    "REGROWTHS",
    "REMOVALS",
    "SPARSE_METHODS",
    "TOPOLOGIES",
    "WEIGHT_INITS",
    "SparseConfig",
    "SparseEngine",
    "SparseLinear",
    "active_neuron_fraction",
    "layer_chains",
    "link_scores",
    "remap_optimizer_state",
    "sample_without_replacement",
    "sparse_layers",
    "sparsify_",
]

load_rules()


@register_section("sparse", config=SparseConfig, summary="dynamic sparse training of nn.Linear layers")
def _apply_sparse(model: nn.Module, cfg: SparseConfig, ctx: SectionContext) -> list[Callback]:
    import torch

    from edgetune.sparse.strategies import TOPOLOGIES

    seed = cfg.seed if cfg.seed is not None else ctx.seed
    needs_data = TOPOLOGIES.get(cfg.resolved().topology).needs_data  # e.g. CSTI reads the training inputs
    inputs = ctx.sample_inputs() if (needs_data and ctx.sample_inputs is not None) else None
    sparsify_(model, cfg, generator=torch.Generator().manual_seed(seed), train_inputs=inputs)
    return [SparseEngine(model, cfg, seed=seed)]
