"""``sparsify_``: replace selected ``nn.Linear`` layers by :class:`SparseLinear` with an initial topology.

This is the only module of the sparse family that walks the module tree (with edgetune.core's
selection and surgery helpers); the rules it applies are pure functions.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping

import torch
from torch import nn

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.core.select import make_filter, select_modules
from edgetune.core.surgery import replace_module
from edgetune.sparse.config import SparseConfig
from edgetune.sparse.layer import SparseLinear
from edgetune.sparse.strategies import (
    TOPOLOGIES,
    WEIGHT_INITS,
    InitContext,
    TopologyContext,
    load_rules,
    rule_options,
)
from edgetune.sparse.topology import link_count

__all__ = ["hidden_tails", "initial_mask", "initial_weight", "layer_chains", "sparse_layers", "sparsify_"]

log = logging.getLogger(__name__)
load_rules()


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseLinear]]:
    """``(name, layer)`` of every SparseLinear in ``model``, in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]


def _tied(model: nn.Module) -> set[int]:
    """ids of parameters that appear under more than one module (tied weights)."""
    seen: dict[int, int] = {}
    for _, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def _targets(model: nn.Module, cfg: SparseConfig) -> list[tuple[str, nn.Linear]]:
    chosen = select_modules(model, make_filter(cfg.include, cfg.exclude, (nn.Linear,)))
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    tied = _tied(model)
    out = []
    for name, mod in chosen:
        if cfg.dense_head and linears and name == linears[-1]:
            continue
        if id(mod.weight) in tied:
            log.info("sparse: %s shares its weight with another module (tied); it stays dense", name)
            continue
        out.append((name, mod))
    return out


def initial_mask(
    out_f: int,
    in_f: int,
    density: float,
    cfg: SparseConfig,
    generator: torch.Generator,
    train_inputs: torch.Tensor | None = None,
    *,
    layer: str = "",
) -> torch.Tensor:
    """The initial bool mask ``(out, in)`` with exactly ``round(density*out*in)`` links (``cfg.topology``)."""
    name = cfg.topology or "er"
    rule = TOPOLOGIES.get(name)
    ctx = TopologyContext(
        layer=layer,
        generator=generator,
        train_inputs=train_inputs,
        options=rule_options("topology", name, cfg.topology_options),
        params={p: getattr(cfg, p) for p in rule.params},
    )
    return rule.fn(out_f, in_f, density, ctx)


def initial_weight(
    mask: torch.Tensor,
    weight: torch.Tensor,
    density: float,
    cfg: SparseConfig,
    generator: torch.Generator,
    *,
    layer: str = "",
) -> torch.Tensor:
    """Initial values ``(out, in)`` on ``mask`` by ``cfg.weight_init`` (``weight``: the dense layer's, CPU)."""
    rule = WEIGHT_INITS.get(cfg.weight_init)
    ctx = InitContext(
        layer=layer,
        generator=generator,
        density=density,
        weight=weight,
        options=rule_options("weight_init", cfg.weight_init, cfg.weight_init_options),
    )
    return rule.fn(mask, ctx)


def sparsify_(
    model: nn.Module,
    cfg: SparseConfig,
    *,
    generator: torch.Generator | None = None,
    train_inputs: torch.Tensor | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Replace the layers ``cfg`` selects by SparseLinear layers; return ``model``.

    The initial density is ``cfg.initial_density`` when the method decays density, else ``cfg.density``.
    Weights on the initial links follow ``cfg.weight_init``. ``train_inputs`` ``(N, ...)`` feeds CSTI.
    ``masks`` maps layer names to bool ``(out, in)`` masks to start from instead of ``cfg.topology``
    (each with the link count of the initial density, so the schedule holds).
    Raises ConfigError when no layer matches, a layer is too small for the initial or final density, or a
    given mask names another layer or holds another count; ShapeError when a mask's shape is not its layer's.
    """
    cfg = cfg.resolved()
    if generator is None:
        generator = torch.Generator().manual_seed(cfg.seed or 0)
    targets = _targets(model, cfg)
    if not targets:
        raise ConfigError(
            f"sparse: no nn.Linear layer matches include={cfg.include} exclude={cfg.exclude}"
            f"{' (the last Linear stays dense: dense_head=true)' if cfg.dense_head else ''}; "
            "check the patterns against the names printed by print(model)"
        )
    density = cfg.initial_density or cfg.density
    given = dict(masks or {})
    unknown = sorted(set(given) - {n for n, _ in targets})
    if unknown:
        raise ConfigError(
            f"sparse: masks given for {unknown}, which are not layers being sparsified; the layers are "
            f"{[n for n, _ in targets]}"
        )
    for name, lin in targets:
        out_f, in_f = lin.out_features, lin.in_features
        for what, d in (("initial density", density), ("final density", cfg.density)):
            try:
                link_count(out_f, in_f, d)
            except ConfigError as err:
                raise ConfigError(f"sparse layer {name!r} ({what}): {err}") from None
        if name in given:
            mask = _given_mask(name, lin, given[name], density)
        else:
            mask = initial_mask(out_f, in_f, density, cfg, generator, train_inputs, layer=name).to(
                lin.weight.device
            )
        with torch.no_grad():
            w = initial_weight(mask.cpu(), lin.weight.detach().cpu(), density, cfg, generator, layer=name)
            lin.weight.copy_(w.to(lin.weight.device))
        layer = SparseLinear.from_dense(lin, mask, backend=cfg.backend)
        replace_module(model, name, layer)
        log.debug("sparse: %s -> %d links (%.4g density)", name, layer.nnz(), layer.density)
    n = sum(m.nnz() for _, m in sparse_layers(model))
    total = sum(m.in_features * m.out_features for _, m in sparse_layers(model))
    log.info(
        "sparse (%s): %d layers, %d of %d links (%.3g%%)",
        cfg.method,
        len(targets),
        n,
        total,
        100 * n / max(1, total),
    )
    return model


def _given_mask(name: str, lin: nn.Linear, mask: torch.Tensor, density: float) -> torch.Tensor:
    shape = (lin.out_features, lin.in_features)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ShapeError(
            f"sparse layer {name!r}: mask shape {got} does not match its weight (out, in) = {shape}; "
            f"pass a bool mask of shape {shape}"
        )
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ShapeError(
            f"sparse layer {name!r}: the mask must be bool (or 0/1), got dtype {mask.dtype} with other values"
        )
    mask = mask.to(device=lin.weight.device, dtype=torch.bool)
    want, got_n = link_count(*shape, density), int(mask.sum())
    if got_n != want:
        raise ConfigError(
            f"sparse layer {name!r}: the mask holds {got_n} links but density {density:g} means {want}; "
            f"set sparse.density (or initial_density) to {got_n / (shape[0] * shape[1]):.6g}, or pass a "
            f"mask with {want} links"
        )
    return mask


# (first, second) paths under one parent module where first's outputs are second's inputs, neuron for neuron:
# MLPs (fc1/fc2), attention values to the output projection, Hugging Face GPT-2 (c_fc/c_proj, as Linear),
# Llama/Mistral/Qwen gated MLPs (gate_proj and up_proj both feed down_proj: a hidden neuron dies when either
# of its input rows or its down_proj column is empty), Llama attention (v_proj/o_proj, when the head counts
# match), BERT (intermediate.dense/output.dense, attention.self.value/attention.output.dense)
_CHAIN_PAIRS = (
    ("fc1", "fc2"),
    ("v_proj", "out_proj"),
    ("v_proj", "o_proj"),
    ("c_fc", "c_proj"),
    ("gate_proj", "down_proj"),
    ("up_proj", "down_proj"),
    ("intermediate.dense", "output.dense"),
    ("attention.self.value", "attention.output.dense"),
)
# modules that act on each feature alone: a neuron's output still feeds only its own input downstream
_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Mish,
    nn.Hardtanh,
    nn.Dropout,
    nn.Identity,
    nn.BatchNorm1d,
)


def _elementwise_between(model: nn.Module | None, parent: str, lo: int, hi: int) -> bool:
    """True when children ``lo+1 .. hi-1`` of container ``parent`` of ``model`` all act per feature."""
    if model is None:
        return hi == lo + 1
    try:
        container = model.get_submodule(parent) if parent else model
    except AttributeError:
        return False
    return all(isinstance(getattr(container, str(j), None), _ELEMENTWISE) for j in range(lo + 1, hi))


def layer_chains(layers: list[tuple[str, SparseLinear]], model: nn.Module | None = None) -> list[list[int]]:
    """Index chains of layers where each one's outputs are the next one's inputs.

    Recognised: numbered children of one container with matching sizes, either consecutive
    (``layers.0 -> layers.1 -> ...``) or, given ``model``, separated only by per-feature modules
    (``nn.Sequential(Linear, ReLU, Dropout, Linear)``); and, under one parent, the pairs fc1 -> fc2,
    v_proj -> out_proj / o_proj, and the Hugging Face names c_fc -> c_proj (GPT-2), gate_proj -> down_proj
    and up_proj -> down_proj (Llama: two chains share down_proj), intermediate.dense -> output.dense and
    attention.self.value -> attention.output.dense (BERT).
    """
    info = []
    for i, (name, m) in enumerate(layers):
        parent, _, leaf = name.rpartition(".")
        info.append((i, parent, leaf, m))
    chains: list[list[int]] = []
    # numbered children of one container
    by_parent: dict[str, list[tuple[int, int]]] = {}
    for i, parent, leaf, _ in info:
        if leaf.isdigit():
            by_parent.setdefault(parent, []).append((int(leaf), i))
    for parent, members in by_parent.items():
        members.sort()
        cur = [members[0][1]]
        for (pa, a), (pb, b) in itertools.pairwise(members):
            if layers[a][1].out_features == layers[b][1].in_features and _elementwise_between(
                model, parent, pa, pb
            ):
                cur.append(b)
            else:
                if len(cur) > 1:
                    chains.append(cur)
                cur = [b]
        if len(cur) > 1:
            chains.append(cur)
    names = {name: i for i, (name, _) in enumerate(layers)}
    for name, i in names.items():
        for first, second in _CHAIN_PAIRS:
            if name == first or name.endswith("." + first):
                parent = name[: len(name) - len(first)]  # "" or "prefix."
                j = names.get(parent + second)
                if j is not None and layers[i][1].out_features == layers[j][1].in_features:
                    chains.append([i, j])
    return chains


def hidden_tails(
    model: nn.Module, layers: list[tuple[str, SparseLinear]], chains: list[list[int]]
) -> list[int]:
    """Last layers of numbered chains (MLP stacks) whose outputs are hidden: not the model's last Linear."""
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, SparseLinear))]
    last = linears[-1] if linears else None
    tails = []
    for chain in chains:
        name = layers[chain[-1]][0]
        if name.rpartition(".")[2].isdigit() and name != last:
            tails.append(chain[-1])
    return tails
