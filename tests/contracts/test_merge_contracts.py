"""Contracts every registered merge method keeps, on small state dicts (a linear layer, a norm, an int buffer).

Merging one model returns it; identical inputs return the input; weights [1, 0] return the first model; with
density 1 (and its other pruning options off) a density method is task arithmetic exactly; commutative methods do
not depend on the order of the models; each key merges on its own (what streaming relies on); DARE is reproducible
for a seed and differs for another; bf16 in gives finite bf16 out; integer buffers are copied. A method is covered
the moment it is registered.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from edgetune.core.config import validate
from edgetune.merging import MERGERS, MergeConfig, merge, merger_for

ALL = MERGERS.names()
#: the methods that merge weights alone (the data-aware ones need a model and data: their own contracts below)
METHODS = [m for m in ALL if not MERGERS.get(m).data_aware]
DATA_AWARE = [m for m in ALL if MERGERS.get(m).data_aware]
SD = dict[str, torch.Tensor]


def _base(dtype: torch.dtype = torch.float32) -> SD:
    g = torch.Generator().manual_seed(0)
    return {"lin.weight": torch.randn(6, 7, generator=g).to(dtype), "lin.bias": torch.randn(6, generator=g).to(dtype),
            "norm.weight": (1 + 0.1 * torch.randn(7, generator=g)).to(dtype), "pos_ids": torch.arange(7)}


def _finetunes(n: int, dtype: torch.dtype = torch.float32, base: SD | None = None) -> list[SD]:
    """``n`` fine-tunes of :func:`_base`: its floating tensors moved by different random task vectors."""
    base = base or _base(dtype)
    g = torch.Generator().manual_seed(1)
    return [{k: (v + 0.3 * torch.randn(v.shape, generator=g).to(dtype)) if v.is_floating_point() else v.clone()
             for k, v in base.items()} for _ in range(n)]


def _meta(method: str, key: str) -> dict[str, Any]:
    return dict(MERGERS.entry(method).meta.get(key, {}))


def _cfg(method: str, **options: Any) -> MergeConfig:
    return validate(MergeConfig, {"method": method, **options})


def _base_if_needed(method: str, base: SD) -> SD | None:
    return base if MERGERS.get(method).needs_base else None


def _close(a: SD, b: SD, atol: float = 1e-6) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("method", ALL)
def test_registration(method: str) -> None:
    entry = MERGERS.entry(method)
    assert entry.config is not None and issubclass(entry.config, MergeConfig)
    assert re.search(r"\(.*(19|20)\d\d\)", entry.summary), f"the summary of {method} should name its paper"
    cfg = _cfg(method)
    assert type(cfg) is entry.config and validate(MergeConfig, cfg.to_dict()) == cfg
    merger = merger_for(cfg)
    if merger.density_option is not None:
        assert merger.density_option in entry.config.model_fields
        assert "keep_all" in entry.meta and "as_task_arithmetic" in entry.meta, (
            f"{method} has a density option: its MERGERS entry must say which options keep every entry (keep_all) "
            "and which make it task arithmetic (as_task_arithmetic)")


@pytest.mark.parametrize("method", METHODS)
def test_one_model_returns_it(method: str) -> None:
    (model,) = _finetunes(1)
    out = merge([model], _cfg(method, **_meta(method, "keep_all")), base=_base_if_needed(method, _base()))
    _close(out, model)
    for k in out:  # a new state dict: nothing shares memory with the input
        assert out[k].data_ptr() != model[k].data_ptr(), k


@pytest.mark.parametrize("method", METHODS)
def test_identical_inputs_return_the_input(method: str) -> None:
    model = _finetunes(1)[0]
    out = merge([model, model, model], _cfg(method), base=_base_if_needed(method, model))
    _close(out, model)


@pytest.mark.parametrize("method", METHODS)
def test_identical_finetunes_of_another_base_return_the_input(method: str) -> None:
    """Three copies of one fine-tune, merged against the base it came from (task vectors not zero), with weights
    that sum to 1 where the method takes weights and every entry kept: the fine-tune itself."""
    model = _finetunes(1)[0]
    options = dict(_meta(method, "keep_all"))
    if merger_for(_cfg(method)).takes_weights:
        options["weights"] = [1 / 3] * 3
    out = merge([model, model, model], _cfg(method, **options), base=_base_if_needed(method, _base()))
    _close(out, model, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_weights_one_zero_return_the_first(method: str) -> None:
    if not merger_for(_cfg(method)).takes_weights:
        pytest.skip(f"{method} takes no weights (its merge ratio comes from the models themselves)")
    a, b = _finetunes(2)
    out = merge([a, b], _cfg(method, weights=[1.0, 0.0], **_meta(method, "keep_all")),
                base=_base_if_needed(method, _base()))
    _close(out, a)


@pytest.mark.parametrize("method", METHODS)
def test_density_one_is_task_arithmetic(method: str) -> None:
    if merger_for(_cfg(method)).density_option is None:
        pytest.skip(f"{method} has no density option")
    models, base = _finetunes(3), _base()
    shared = {"weights": [0.5, -0.3, 1.2], "scaling": 0.7}
    got = merge(models, _cfg(method, **shared, **_meta(method, "as_task_arithmetic")), base=base)
    want = merge(models, _cfg("task_arithmetic", **shared), base=base)
    _close(got, want, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_commutative_methods_are_order_invariant(method: str) -> None:
    merger = merger_for(_cfg(method))
    if not merger.commutative:
        pytest.skip(f"{method} is not commutative (registered commutative=False)")
    models, base = _finetunes(3), _base_if_needed(method, _base())
    weights = [1.0, 2.0, 0.5]
    opts = {"weights": weights} if merger.takes_weights else {}
    order = [2, 0, 1]
    out = merge(models, _cfg(method, **opts), base=base)
    opts_perm = {"weights": [weights[i] for i in order]} if merger.takes_weights else {}
    out_perm = merge([models[i] for i in order], _cfg(method, **opts_perm), base=base)
    _close(out_perm, out, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_each_key_merges_on_its_own(method: str) -> None:
    """A key's merge depends on nothing but that key's tensors (a streaming merge reads one key at a time)."""
    if MERGERS.get(method).whole_model:
        pytest.skip(f"{method} works on whole models (whole_model=True): it does not merge key by key")
    models, base = _finetunes(3), _base_if_needed(method, _base())
    full = merge(models, _cfg(method, seed=4), base=base)
    keys = list(reversed(full))
    rev = merge([{k: m[k] for k in keys} for m in models], _cfg(method, seed=4),
                base=None if base is None else {k: base[k] for k in keys})
    _close({k: rev[k] for k in full}, full, atol=0)
    merger = merger_for(_cfg(method, seed=4))
    one = merger.merge_tensor("lin.weight", [m["lin.weight"] for m in models],
                              None if base is None else base["lin.weight"])
    assert torch.equal(one, full["lin.weight"])


def test_dare_is_reproducible_for_a_seed() -> None:
    models, base = _finetunes(3), _base()
    a = merge(models, _cfg("dare", seed=3), base=base)
    b = merge(models, _cfg("dare", seed=3), base=base)
    c = merge(models, _cfg("dare", seed=4), base=base)
    _close(a, b, atol=0)
    assert not torch.equal(a["lin.weight"], c["lin.weight"])


@pytest.mark.parametrize("method", METHODS)
def test_bf16_in_bf16_out_finite(method: str) -> None:
    base = _base(torch.bfloat16)
    models = _finetunes(2, torch.bfloat16, base)
    out = merge(models, _cfg(method), base=_base_if_needed(method, base))
    for k, v in out.items():
        if k == "pos_ids":
            continue
        assert v.dtype == torch.bfloat16 and torch.isfinite(v).all(), k
    wide = merge(models, _cfg(method, dtype="float32"), base=_base_if_needed(method, base))
    assert all(v.dtype == torch.float32 for k, v in wide.items() if k != "pos_ids")


@pytest.mark.parametrize("method", METHODS)
def test_integer_buffers_are_copied(method: str) -> None:
    models = _finetunes(3)
    out = merge(models, _cfg(method, dtype="bfloat16"), base=_base_if_needed(method, _base()))
    assert out["pos_ids"].dtype == torch.int64 and torch.equal(out["pos_ids"], models[0]["pos_ids"])
    assert out["pos_ids"].data_ptr() != models[0]["pos_ids"].data_ptr()


# ------------------------------------------------------------------------------------------------ data-aware
def _tiny() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(64, 5)
    return net, x, net(x).argmax(1).detach()


@pytest.mark.parametrize("method", DATA_AWARE)
def test_data_aware_refuses_the_weights_only_paths(method: str, tmp_path) -> None:
    from edgetune.core.errors import ConfigError
    from edgetune.merging import stream_merge

    net, _, _ = _tiny()
    sd = net.state_dict()
    with pytest.raises(ConfigError, match="data"):
        merge([sd, sd], _cfg(method), base=sd)
    with pytest.raises(ConfigError, match="data"):
        stream_merge([sd, sd], merger_for(_cfg(method)), tmp_path / "x.safetensors", base=sd)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("method", DATA_AWARE)
def test_data_aware_identical_inputs_return_the_input(method: str) -> None:
    from edgetune.merging import merge_with_data, must_keep_from_reference

    net, x, y = _tiny()
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    data = torch.utils.data.TensorDataset(x, y)
    keep = must_keep_from_reference(net, x) if method == "safety" else None
    out = merge_with_data(_cfg(method), net, [sd, sd], sd, data, must_keep=keep)
    _close(out, sd, atol=1e-5)
    assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items())  # the module is not modified


@pytest.mark.parametrize("method", DATA_AWARE)
def test_data_aware_merges_tied_weights_once(method: str) -> None:
    """A head tied to the embedding (as SmolLM2's is) is one tensor: merged once, the same under both names (review
    finding: AdaMerging / safety crashed in functional_call, Fisher / RegMean gave the two names different values)."""
    from edgetune.merging import merge_with_data

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mid = torch.nn.Embedding(10, 6), torch.nn.Linear(6, 6)
            self.head = torch.nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mid(self.emb(x))))

    torch.manual_seed(0)
    net = Tied()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    fts = []
    for _ in range(2):
        sd = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
        sd["head.weight"] = sd["emb.weight"]
        fts.append(sd)
    x, y = torch.randint(0, 10, (32, 3)), torch.randint(0, 10, (32, 3))
    opts = {"steps": 3} if method in ("adamerging", "safety") else {}
    out = merge_with_data(_cfg(method, **opts), net, fts, base, [[x, y]], must_keep=[[x, y]])
    assert set(out) == set(base) and torch.equal(out["emb.weight"], out["head.weight"])
    assert not torch.equal(out["emb.weight"], base["emb.weight"])
