"""Every bad merge input raises one ConfigError naming the problem and the fix, before any tensor is merged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError
from edgetune.merging import MERGERS, MergeConfig, Merger, TiesConfig, merge


def _sd(*, w: tuple[int, ...] = (4, 5), extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.randn(w), "fc.bias": torch.randn(w[0]), "pos_ids": torch.arange(6), **(extra or {})}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the tensors merged; a check that fails must leave it empty (nothing merged, no partial result)."""
    seen: list[str] = []
    original = Merger.merge_tensor

    def spy(self: Merger, name: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
        seen.append(name)
        return original(self, name, tensors, base)

    monkeypatch.setattr(Merger, "merge_tensor", spy)
    return seen


def _raises(match: str, models: object, cfg: object, base: object = None) -> None:
    with pytest.raises(ConfigError, match=match):
        merge(models, cfg, base=base)  # type: ignore[arg-type]


TA = {"method": "task_arithmetic"}


def test_no_models(calls: list[str]) -> None:
    _raises(r"no models to merge: pass a list of state dicts", [], {"method": "linear"})
    _raises(r"models must be a list of state dicts .* got a dict; wrap a single state dict in a list", _sd(),
            {"method": "linear"})
    _raises(r"got a generator", (m for m in [_sd()]), {"method": "linear"})
    assert not calls


def test_a_module_instead_of_a_state_dict(calls: list[str]) -> None:
    _raises(r"model 1 is a Linear, not a state dict; pass model.state_dict\(\)", [_sd(), nn.Linear(2, 2)], TA, _sd())
    _raises(r"base is a Linear, not a state dict", [_sd(), _sd()], TA, nn.Linear(2, 2))
    assert not calls


def test_keys_differ(calls: list[str]) -> None:
    a, b = _sd(), _sd()
    del b["fc.bias"]
    b["head.weight"] = torch.zeros(2)
    _raises(r"model 2 has other keys than model 0: it lacks 'fc.bias' and has extra 'head.weight'.*one architecture",
            [a, a, b], {"method": "linear"})
    many = {f"k{i}": torch.zeros(1) for i in range(7)}
    _raises(r"lacks 'k0', 'k1', 'k2' \(\+4 more\)", [{**a, **many}, a], {"method": "linear"})
    assert not calls


def test_shapes_differ(calls: list[str]) -> None:
    _raises(r"shapes differ: 'fc.weight' is \(4, 5\) in model 0 but \(4, 6\) in model 1.*one architecture",
            [_sd(), _sd(w=(4, 6))], {"method": "linear"})
    assert not calls


@pytest.mark.parametrize("method", [m for m in MERGERS.names() if MERGERS.get(m).needs_base])
def test_base_missing(method: str, calls: list[str]) -> None:
    _raises(rf"method '{method}' needs a base model: pass base=\.\.\. / `base:` in the merge config",
            [_sd(), _sd()], {"method": method})
    assert not calls


def test_base_keys_or_shapes_differ(calls: list[str]) -> None:
    base = _sd()
    del base["fc.bias"]
    _raises(r"the base model has other keys than model 0: it lacks 'fc.bias'", [_sd(), _sd()], TA, base)
    _raises(r"'fc.weight' is \(4, 5\) in model 0 but \(3, 5\) in the base model", [_sd(), _sd()], TA, _sd(w=(3, 5)))
    assert not calls


def test_weights_length(calls: list[str]) -> None:
    _raises(r"weights has 3 entries for 2 models; give one weight per model", [_sd(), _sd()],
            {**TA, "weights": [1, 2, 3]}, _sd())
    assert not calls


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(bad: float, calls: list[str]) -> None:
    _raises(r"weights must be finite numbers", [_sd(), _sd()], {**TA, "weights": [1.0, bad]}, _sd())
    # a config built without validation is still checked by the merge
    cfg = MERGERS.entry("task_arithmetic").config.model_construct(method="task_arithmetic", weights=[1.0, bad])
    _raises(r"weights must be finite numbers", [_sd(), _sd()], cfg, _sd())
    assert not calls


@pytest.mark.parametrize("method", [m for m in MERGERS.names() if MERGERS.get(m).density_option])
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_0_1(method: str, density: float, calls: list[str]) -> None:
    option = MERGERS.get(method).density_option
    with pytest.raises(ConfigError, match=option):
        validate(MergeConfig, {"method": method, option: density})
    cfg = MERGERS.entry(method).config.model_construct(**{**MERGERS.entry(method).config().model_dump(),
                                                          option: density})
    _raises(rf"{option} = .* must be in \(0, 1\]", [_sd(), _sd()], cfg, _sd())
    assert not calls


def test_integer_buffers_must_be_equal(calls: list[str]) -> None:
    other = _sd()
    other["pos_ids"] = torch.arange(6).flip(0)
    _raises(r"'pos_ids' is a int64 tensor .* differs between model 0 and model 2.*drop the key", [_sd(), _sd(), other],
            {"method": "linear"})
    mixed = _sd()
    mixed["pos_ids"] = torch.arange(6).float()
    _raises(r"'pos_ids' is a floating tensor in some models and not in others", [_sd(), mixed], {"method": "linear"})
    assert not calls


def test_batch_norm_step_counters_may_differ() -> None:
    a, b = _sd(extra={"bn.num_batches_tracked": torch.tensor(10)}), _sd(extra={"bn.num_batches_tracked": torch.tensor(7)})
    assert merge([a, b], {"method": "linear"})["bn.num_batches_tracked"] == 10


def test_bad_configs() -> None:
    with pytest.raises(ConfigError, match=r'unknown merge method .tis.\. Did you mean "ties"\?'):
        validate(MergeConfig, {"method": "tis"})
    with pytest.raises(ConfigError, match=r"say which merge method"):
        validate(MergeConfig, {"density": 0.3})
    with pytest.raises(ConfigError, match=r"unknown key 'combine'"):
        validate(MergeConfig, {"method": "ties", "combine": "sum"})
    with pytest.raises(ConfigError, match=r"model_stock takes no weights"):
        validate(MergeConfig, {"method": "model_stock", "weights": [1, 1]})
    with pytest.raises(ConfigError, match=r"sum to 0.*normalize: false"):
        validate(MergeConfig, {"method": "linear", "weights": [1, -1]})
    with pytest.raises(ConfigError, match=r"beta \+ density .* passes 1"):
        validate(MergeConfig, {"method": "breadcrumbs", "density": 0.995, "beta": 0.01})
    with pytest.raises(ConfigError, match=r'dtype .bf61. is not a floating dtype\. Did you mean "bf16"'):
        validate(MergeConfig, {"method": "linear", "dtype": "bf61"})
    with pytest.raises(ConfigError, match=r"weights is empty"):
        validate(MergeConfig, {"method": "linear", "weights": []})
    with pytest.raises(ConfigError, match=r"must be a MergeConfig or a mapping"):
        merge([_sd()], "ties")  # type: ignore[arg-type]
    assert validate(MergeConfig, {"method": "linear", "dtype": "BF16"}).dtype == "bfloat16"
    assert validate(MergeConfig, {"method": "TIES"}) == TiesConfig()


def test_inputs_are_left_unchanged() -> None:
    models, base = [_sd(), _sd()], _sd()
    before = [{k: v.clone() for k, v in m.items()} for m in (*models, base)]
    for method in MERGERS.names():
        if not MERGERS.get(method).data_aware:  # those need a model and data: tests/unit/merging/test_{fisher,...}
            merge(models, {"method": method}, base=base)
    for m, b in zip((*models, base), before, strict=True):
        assert all(torch.equal(m[k], b[k]) for k in b)
