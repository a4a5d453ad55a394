"""Invariants of every registered sparse rule, looped over the registries: registering a rule tests it.

Per rule, on tiny layers: removal cuts exactly k active links; regrowth adds exactly k inactive links;
topologies hold exactly link_count links; weight inits are zero off the mask; all are seeded. Per engine
case (every method, and every removal, regrowth and density schedule on top of a base method): after an
update the density is the scheduled one, no link is duplicated, survivors keep weight and optimizer
moments, regrown links start at zero, and the same seed gives the same masks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from edgetune.core.errors import ConfigError
from edgetune.core.hooks import TrainState
from edgetune.core.registry import Registry
from edgetune.models.mlp import MLP
from edgetune.sparse import SPARSE_METHODS, SparseConfig, SparseEngine, SparseLinear, sparse_layers, sparsify_
from edgetune.sparse.strategies import (
    DENSITY_SCHEDULES,
    REGROWTHS,
    REMOVALS,
    TOPOLOGIES,
    WEIGHT_INITS,
    InitContext,
    RuleContext,
    TopologyContext,
    load_rules,
    rule_options,
)
from edgetune.sparse.topology import link_count

load_rules()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ctx(kind: str, name: str, seed: int = 0, grad: torch.Tensor | None = None) -> RuleContext:
    return RuleContext(
        layer="fc",
        step=1,
        generator=gen(seed),
        temperature=2.0,
        grad=grad,
        options=rule_options(kind, name, None),
    )


# ------------------------------------------------------------------------------------ rules on their own
@pytest.mark.parametrize("name", REMOVALS.names())
def test_removal_rule_exact_count_active_only_seeded(name):
    rule = REMOVALS.get(name)
    for trial in range(3):
        w = torch.randn(13, 11, generator=gen(trial))
        m = torch.rand(13, 11, generator=gen(50 + trial)) < 0.4
        w[~m] = 0.0  # inactive entries hold the smallest |w|: a rule that ignores the mask would pick them
        grad = torch.randn(13, 11, generator=gen(90 + trial)) if rule.needs_gradients else None
        nnz = int(m.sum())
        for k in (0, 1, nnz // 3, nnz):
            out = rule.fn(w, m, k, ctx("removal", name, 7, grad))
            assert out.dtype == torch.bool and out.shape == m.shape
            assert int(out.sum()) == k and not bool((out & ~m).any())
            assert torch.equal(out, rule.fn(w, m, k, ctx("removal", name, 7, grad)))


@pytest.mark.parametrize("name", REGROWTHS.names())
def test_regrowth_rule_exact_count_never_on_live_links_seeded(name):
    rule = REGROWTHS.get(name)
    m = torch.rand(14, 12, generator=gen(3)) < 0.2
    grad = torch.randn(14, 12, generator=gen(4)) if rule.needs_gradients else None
    for k in (1, 9, 40) if rule.evolves else (0,):
        new = rule.fn(m, k, ctx("regrowth", name, 5, grad))
        assert new.dtype == torch.bool and new.shape == m.shape
        assert int(new.sum()) == k and not bool((new & m).any())
        assert torch.equal(new, rule.fn(m, k, ctx("regrowth", name, 5, grad)))


@pytest.mark.parametrize("name", TOPOLOGIES.names())
def test_topology_rule_exact_count_seeded(name):
    rule = TOPOLOGIES.get(name)
    x = torch.randn(50, 20, generator=gen(1))
    cfg = SparseConfig(topology=name).resolved()

    def build(seed: int) -> torch.Tensor:
        c = TopologyContext(
            layer="fc",
            generator=gen(seed),
            train_inputs=x,
            options=rule_options("topology", name, None),
            params={p: getattr(cfg, p) for p in rule.params},
        )
        return rule.fn(30, 20, 0.15, c)

    m = build(0)
    assert m.dtype == torch.bool and m.shape == (30, 20) and int(m.sum()) == link_count(30, 20, 0.15)
    assert torch.equal(m, build(0))


@pytest.mark.parametrize("name", WEIGHT_INITS.names())
def test_weight_init_zero_off_the_mask_seeded(name):
    rule = WEIGHT_INITS.get(name)
    m = torch.rand(16, 24, generator=gen(2)) < 0.25
    dense = torch.randn(16, 24, generator=gen(3))

    def init(seed: int) -> torch.Tensor:
        return rule.fn(
            m,
            InitContext(
                layer="fc",
                generator=gen(seed),
                density=0.25,
                weight=dense,
                options=rule_options("weight_init", name, None),
            ),
        )

    w = init(0)
    assert w.shape == m.shape and w.dtype == dense.dtype and torch.isfinite(w).all()
    assert bool((w[m] != 0).all()), "every initial link carries a value"
    assert torch.equal(w * m, init(0) * m)


def test_registries_refuse_duplicates_and_list_names_on_unknown():
    for reg in (REMOVALS, REGROWTHS, TOPOLOGIES, WEIGHT_INITS, DENSITY_SCHEDULES):
        name = reg.names()[0]
        with pytest.raises(ValueError, match="already registered"):
            reg.add(name, reg.get(name))
    with pytest.raises(ConfigError, match=r"sparse.removal='magnitud'.*Did you mean \"magnitude\".*mest"):
        _validate({"removal": "magnitud"})
    with pytest.raises(
        ConfigError, match=r"sparse.regrowth='grad'.*ch_hard, ch_soft, gradient, none, random"
    ):
        _validate({"regrowth": "grad"})
    with pytest.raises(ConfigError, match=r"sparse.topology='sw'.*brf, bsw, csti, er"):
        _validate({"topology": "sw"})
    with pytest.raises(ConfigError, match=r"sparse.weight_init='xavier'.*kaiming, keep, swi"):
        _validate({"weight_init": "xavier"})
    with pytest.raises(ConfigError, match=r"sparse.density_schedule='ems'.*em_s"):
        _validate({"density_schedule": "ems"})


def _validate(data: dict[str, Any]) -> SparseConfig:
    from edgetune.core.config import validate

    return validate(SparseConfig, data)


def test_every_method_names_registered_rules():
    from edgetune.sparse.config import RULE_KINDS
    from edgetune.sparse.strategies import registry_of

    for e in SPARSE_METHODS.entries():
        for kind in RULE_KINDS:
            if kind in e.obj:
                assert e.obj[kind] in registry_of(kind), (e.name, kind, e.obj[kind])
        resolved = SparseConfig(method=e.name, density=0.2).resolved()
        for kind in RULE_KINDS:
            assert getattr(resolved, kind) in registry_of(kind), (e.name, kind)


def test_every_registered_rule_is_listed_by_ls_methods():
    kinds = Registry.all()
    for reg in (REMOVALS, REGROWTHS, TOPOLOGIES, WEIGHT_INITS, DENSITY_SCHEDULES):
        assert (
            reg.kind.endswith("method") and kinds[reg.kind] is reg
        )  # `edgetune ls methods` lists *method kinds


# ------------------------------------------------------------------------------------ rules in the engine
def _engine_cases() -> list[dict[str, Any]]:
    cases = [{"method": m} for m in SPARSE_METHODS.names()]
    cases += [{"method": "set", "removal": r} for r in REMOVALS.names()]
    cases += [{"method": "set", "regrowth": g} for g in REGROWTHS.names()]
    cases += [{"method": "chts", "density_schedule": s} for s in DENSITY_SCHEDULES.names()]
    return cases


def _id(case: dict[str, Any]) -> str:
    return "-".join(str(v) for v in case.values())


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(20, 5, [48, 48, 48], "relu", False, 0.0)


def train_steps(
    model: nn.Module, opt: torch.optim.Optimizer, engine: SparseEngine, n: int, total: int = 12
) -> None:
    g = gen(0)
    st = TrainState(
        model=model, optimizer=opt, device=torch.device("cpu"), total_steps=total, steps_per_epoch=3
    )
    engine.on_fit_start(st)
    for _ in range(n):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        st.skip_step = False
        engine.before_optimizer_step(st)
        if not st.skip_step:
            opt.step()
        engine.after_optimizer_step(st)
        st.step += 1


def cfg_for(case: dict[str, Any], **kw: Any) -> SparseConfig:
    return SparseConfig(
        **{"density": 0.2, "update_interval": 3, "update_unit": "steps", "zeta": 0.5, **case, **kw}
    )


@pytest.mark.parametrize("case", _engine_cases(), ids=_id)
def test_update_invariants(case, monkeypatch):
    c = cfg_for(case)
    model = sparsify_(mlp(), c)
    engine = SparseEngine(model, c)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt, engine, 2)  # moments exist before the first update
    before = {
        n: (
            l.mask().clone(),
            l.to_dense_weight().clone(),
            opt.state[l.values]["exp_avg"].clone(),
            l.indices.clone(),
        )
        for n, l in sparse_layers(model)
    }
    regrown: dict[int, torch.Tensor] = {}  # layer id -> dense mask of the links the engine regrew
    set_topology = SparseLinear.set_topology

    def spy(self, idx, vals, optimizer=None, fresh=None):
        grown = torch.zeros(self.out_features, self.in_features, dtype=torch.bool)
        if fresh is not None:
            grown[idx[0][fresh], idx[1][fresh]] = True
        regrown[id(self)] = grown
        return set_topology(self, idx, vals, optimizer, fresh)

    monkeypatch.setattr(SparseLinear, "set_topology", spy)
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    nn.functional.cross_entropy(model(x), y).backward()  # the update batch (gradient rules read it)
    evolves = engine.regrowth.evolves or bool(engine.cfg.initial_density)
    stats = engine.update(3, opt) if evolves else None
    for name, layer in sparse_layers(model):
        mask0, w0, m0, idx0 = before[name]
        mask = layer.mask()
        target = link_count(layer.out_features, layer.in_features, engine.density_at(3))
        assert layer.nnz() == target == int(mask.sum()), "density after the update is the scheduled one"
        assert layer.indices.unique(dim=1).shape[1] == layer.nnz(), "no duplicate links"
        w = layer.to_dense_weight()
        grown = regrown.get(id(layer), torch.zeros_like(mask))
        assert not torch.any(mask & ~mask0 & ~grown), "every link absent before the update was regrown"
        kept = mask & ~grown
        assert torch.all(w[grown] == 0), "regrown links start at zero, also those removed in this update"
        assert torch.equal(w[kept], w0[kept]), "surviving links keep their weights"
        assert torch.all(w[~mask] == 0)
        ex = torch.zeros_like(w)
        ex[layer.indices[0].long(), layer.indices[1].long()] = opt.state[layer.values]["exp_avg"]
        assert torch.all(ex[grown] == 0), "optimizer moments of regrown links are zero"
        old = torch.zeros_like(w)
        old[idx0[0].long(), idx0[1].long()] = m0
        assert torch.equal(ex[kept], old[kept]), "moments follow the surviving links"
    if stats is not None and engine.regrowth.evolves:
        assert stats["sparse_removed"] > 0 and stats["sparse_regrown"] > 0


def masks_after(case: dict[str, Any], seed: int) -> list[torch.Tensor]:
    c = cfg_for(case, seed=seed, update_interval=2)
    model = sparsify_(mlp(1), c)
    engine = SparseEngine(model, c)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, opt, engine, 7)
    return [l.mask() for _, l in sparse_layers(model)]


@pytest.mark.parametrize("case", _engine_cases(), ids=_id)
def test_topology_decisions_are_seeded(case):
    a, b, c = masks_after(case, 1), masks_after(case, 1), masks_after(case, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c)), "another seed must give another topology"


def test_a_link_removed_and_regrown_in_one_update_starts_at_zero():
    """The case test_update_invariants must see at least once: regrowth picks a link removal just cut."""
    c = cfg_for({"method": "set"}, zeta=0.9)
    model = sparsify_(mlp(), c)
    engine = SparseEngine(model, c)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, opt, engine, 2)
    before = [l.mask().clone() for _, l in sparse_layers(model)]
    weights = [l.to_dense_weight().clone() for _, l in sparse_layers(model)]
    engine.update(3, opt)
    back = 0
    for m0, w0, (_, layer) in zip(before, weights, sparse_layers(model)):
        w = layer.to_dense_weight()
        again = m0 & layer.mask() & (w != w0)
        back += int(again.sum())
        assert torch.all(w[again] == 0)
    assert back > 0
