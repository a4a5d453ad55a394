"""Model verbs of the adapters family: add, activate, merge, unmerge, disable, remove, and the adapter's tensors.

Every verb checks its whole input before it changes anything, so a bad call leaves the model as it was::

    add_adapter_(model, LoraConfig(rank=8, alpha=16, targets=["query", "value"]))
    merge_(model)                       # W += s B A in every adapted layer: inference at the base's speed
    unmerge_(model)                     # back to base + adapter
    with disable_adapters(model): ...   # the base model
    remove_adapters_(model)             # the original modules back (``merge=True``: keep the updates in W)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from edgetune.adapters.config import ADAPTERS, KINDS, AdapterConfig
from edgetune.adapters.layer import AdapterLayer, layer_info
from edgetune.core.errors import ConfigError, ShapeError
from edgetune.core.select import _matches
from edgetune.core.surgery import replace_module

__all__ = ["adapter_configs", "adapter_layers", "adapter_names", "adapter_report", "adapter_state_dict",
           "add_adapter_", "disable_adapters", "load_adapter_state_", "merge_", "remove_adapters_",
           "set_active_adapters_", "set_adapter_config_", "unmerge_"]

log = logging.getLogger(__name__)
_CONFIGS = "edgetune_adapter_configs"  # model attribute: adapter name -> its AdapterConfig


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """``(path, AdapterLayer)`` of every adapted layer, in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """Adapter name -> the config it was added with."""
    return dict(getattr(model, _CONFIGS, {}))


def set_adapter_config_(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Replace the stored config of the adapter ``cfg.name`` (a verb that changes an adapter's shape or use, such as
    DyLoRA's rank choice, keeps the config that saving and reloading read in step)."""
    configs = adapter_configs(model)
    if cfg.name not in configs:
        raise ConfigError(f"the model has no adapter named {cfg.name!r}; its adapters: {list(configs) or '(none)'}")
    configs[cfg.name] = cfg
    setattr(model, _CONFIGS, configs)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    return list(adapter_configs(model))


def _candidates(model: nn.Module, cfg: AdapterConfig) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """Layers ``cfg`` selects, and every adaptable layer's name (for the error when nothing matches)."""
    chosen, adaptable = [], []
    inside: list[str] = []  # AdapterLayer paths: their base_layer / adapters are not candidates themselves
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, AdapterLayer):
            inside.append(name)
            info = m.info
        else:
            info = layer_info(m)
        if info is None:
            continue
        kind_ok = info.kind in cfg.kinds or info.type_name in cfg.kinds
        if kind_ok:
            adaptable.append(name)
        if kind_ok and any(_matches(name, p) for p in cfg.targets) and not any(_matches(name, p) for p in cfg.exclude):
            chosen.append((name, m))
    return chosen, adaptable


def _no_match(model: nn.Module, cfg: AdapterConfig, adaptable: list[str]) -> ConfigError:
    if not adaptable:
        kinds = sorted({type(m).__name__ for _, m in model.named_modules() if layer_info(m) is not None})
        return ConfigError(f"the model has no layer of kinds {cfg.kinds} to adapt; it has layers of types "
                           f"{kinds or '(none)'}: set adapter.kinds to one of {list(KINDS)} (or a class name)")
    shown = ", ".join(adaptable[:40]) + (f", ... ({len(adaptable)} in all)" if len(adaptable) > 40 else "")
    return ConfigError(f"adapter targets {cfg.targets} (exclude {cfg.exclude}) match none of the model's "
                       f"{'/'.join(cfg.kinds)} layers. Layers that exist: {shown}. Name some of them in "
                       "adapter.targets (globs on the full or last name, or re: regexes)")


def _freeze(model: nn.Module, keep: Sequence[nn.Parameter], patterns: Sequence[str], head: str | None) -> None:
    """Only ``keep`` and the parameters matching ``patterns`` (``head``: the head module's) stay trainable."""
    keep_ids = {id(p) for p in keep}
    expanded = []
    for pat in patterns:
        if pat == "head":
            if head is None:
                raise ConfigError("adapter.trainable names 'head' but this model has no known classification head; "
                                  "give parameter name patterns instead")
            expanded.append(f"{head}.*")
        else:
            expanded.append(pat)
    names = [n for n, _ in model.named_parameters()]
    unused = [p for p in expanded if not any(_matches(n, p) or (p.endswith(".*") and n.startswith(p[:-1]))
                                             for n in names)]
    if unused:
        raise ConfigError(f"adapter.trainable patterns {unused} match no parameter; parameter names look like "
                          f"{names[:5]}")
    for n, p in model.named_parameters():
        if id(p) in keep_ids:
            continue
        hit = any(_matches(n, pat) or (pat.endswith(".*") and n.startswith(pat[:-1])) for pat in expanded)
        p.requires_grad_(hit)


def add_adapter_(model: nn.Module, cfg: AdapterConfig | None = None, *, name: str | None = None,
                 seed: int | None = None, head: str | None = None, activate: bool = True,
                 freeze: bool = True, **fields: Any) -> nn.Module:
    """Put a new adapter on the layers of ``model`` that ``cfg`` targets; return the model.

    ``cfg`` defaults to LoRA; keyword ``fields`` override its fields (``add_adapter_(m, rank=4, targets=[..])``).
    ``name`` overrides ``cfg.name``; ``seed`` (else ``cfg.seed``, else 0) seeds the initialisation. With
    ``freeze`` every parameter except the new adapter's trainable factors and ``cfg.trainable`` (default: the
    ``head`` module for a classification model) is frozen. ``activate`` adds it to the active set.
    """
    from edgetune.adapters.lora import LoraConfig

    cfg = cfg if cfg is not None else LoraConfig()
    if fields or name:
        cfg = cfg.replace(**fields, **({"name": name} if name else {}))
    if not isinstance(cfg, AdapterConfig):
        raise ConfigError(f"add_adapter_ takes an AdapterConfig (LoraConfig, DoraConfig, ...), got {type(cfg).__name__}")
    if cfg.name in adapter_configs(model):
        raise ConfigError(f"the model already has an adapter named {cfg.name!r}; give the new one another name "
                          f"(adapter.name), or remove the old one with remove_adapters_(model, [{cfg.name!r}])")
    chosen, adaptable = _candidates(model, cfg)
    if not chosen:
        raise _no_match(model, cfg, adaptable)
    unknown = sorted((set(cfg.rank_pattern) | set(cfg.alpha_pattern)) - {path for path, _ in chosen})
    if unknown:
        raise ConfigError(f"adapter rank_pattern / alpha_pattern name layers that the targets do not select: "
                          f"{unknown[:5]}; give exact paths of targeted layers, e.g. {chosen[0][0]!r}")
    cls = ADAPTERS.get(cfg.method)
    gen = torch.Generator().manual_seed(seed if seed is not None else (cfg.seed or 0))
    built: list[tuple[str, nn.Module, Any]] = []
    for path, m in chosen:  # build every adapter first: a rank error leaves the model untouched
        base = m.base_layer if isinstance(m, AdapterLayer) else m
        info = m.info if isinstance(m, AdapterLayer) else layer_info(m)
        try:
            ad = cls(info, cfg.for_layer(path), gen, _reference_tensor(base))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        if info.kind == "embedding":
            ad.padding_idx = getattr(base, "padding_idx", None)
        if hasattr(ad, "attach"):
            ad.attach(base)
        built.append((path, m, ad))
    for path, m, ad in built:
        layer = m if isinstance(m, AdapterLayer) else AdapterLayer(m, layer_info(m))
        if layer is not m:
            replace_module(model, path, layer)
        layer.adapters[cfg.name] = ad
        if activate:
            layer.active.append(cfg.name)
    configs = adapter_configs(model)
    configs[cfg.name] = cfg
    setattr(model, _CONFIGS, configs)
    if freeze:
        keep = [p for _, _, ad in built for p in ad.parameters() if p.requires_grad]
        patterns = cfg.trainable if cfg.trainable is not None else (["head"] if head else [])
        _freeze(model, keep, patterns, head)
    n = sum(p.numel() for _, _, ad in built for p in ad.parameters())
    log.info("adapter %r (%s, rank %d) on %d layers: %d parameters", cfg.name, cfg.method, cfg.rank, len(built), n)
    return model


def _reference_tensor(base: nn.Module) -> Tensor:
    for t in base.parameters():
        return t
    for t in base.buffers():
        if t.is_floating_point():
            return t
    return torch.empty(0)


def _names(model: nn.Module, names: Sequence[str] | str | None, default: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        names = [names]
    names = list(default if names is None else names)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"the model has no adapter named {unknown}; its adapters: {known or '(none)'}")
    return names


def set_active_adapters_(model: nn.Module, names: Sequence[str] | str) -> nn.Module:
    """Make exactly ``names`` active (in that order) on every adapted layer; return the model."""
    names = _names(model, names, [])
    for _, layer in adapter_layers(model):
        layer.active = [n for n in names if n in layer.adapters]
    return model


def merge_(model: nn.Module, names: Sequence[str] | str | None = None) -> nn.Module:
    """Add the update of each named adapter (default: the active ones) into its layers' weights."""
    layers = adapter_layers(model)
    default = [n for n in adapter_names(model) if any(n in lay.active for _, lay in layers)]
    names = _names(model, names, default)
    twice = [n for n in names for _, lay in layers if n in lay.merged]
    if twice:
        raise ConfigError(f"adapter {sorted(set(twice))} is already merged; merging again would add its update twice. "
                          "Call unmerge_ first, or skip this merge")
    for path, lay in layers:
        if any(n in lay.adapters for n in names):
            lay.base_weight()  # a layer that cannot merge refuses before any layer changes
    for _, lay in layers:
        for n in names:
            if n in lay.adapters:
                lay.merge(n)
    return model


def unmerge_(model: nn.Module, names: Sequence[str] | str | None = None) -> nn.Module:
    """Subtract the update of each named adapter (default: every merged one) from its layers' weights."""
    layers = adapter_layers(model)
    merged = [n for n in adapter_names(model) if any(n in lay.merged for _, lay in layers)]
    if names is None and not merged:
        raise ConfigError(f"no adapter is merged, so there is nothing to unmerge; adapters {adapter_names(model)} are not merged")
    names = _names(model, names, merged)
    missing = [n for n in names if n not in merged]
    if missing:
        raise ConfigError(f"adapter {missing} is not merged, so there is nothing to unmerge; merged adapters: "
                          f"{merged or '(none)'}")
    for _, lay in layers:
        for n in reversed(names):
            if n in lay.merged:
                lay.unmerge(n)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model is its base: adapters are skipped, merged ones are taken out and put back."""
    layers = adapter_layers(model)
    merged = [(lay, list(lay.merged)) for _, lay in layers]
    with torch.no_grad():
        for lay, names in merged:
            for n in reversed(names):
                lay.unmerge(n)
    for _, lay in layers:
        lay.disabled = True
    try:
        yield model
    finally:
        for _, lay in layers:
            lay.disabled = False
        with torch.no_grad():
            for lay, names in merged:
                for n in names:
                    lay.merge(n)


def remove_adapters_(model: nn.Module, names: Sequence[str] | str | None = None, *, merge: bool = False
                     ) -> nn.Module:
    """Take the named adapters (default: all) off the model; ``merge=True`` keeps their updates in the weights
    (PEFT's ``merge_and_unload``). A layer left with no adapter becomes its original module again."""
    names = _names(model, names, adapter_names(model))
    if merge:
        pending = [n for n in names if not any(n in lay.merged for _, lay in adapter_layers(model))]
        if pending:
            merge_(model, pending)
    for path, lay in adapter_layers(model):
        for n in names:
            if n not in lay.adapters:
                continue
            if n in lay.merged and not merge:
                lay.unmerge(n)
            if n in lay.merged:
                lay.merged.remove(n)
            del lay.adapters[n]
            lay.active = [a for a in lay.active if a != n]
        if len(lay.adapters) == 0:
            replace_module(model, path, lay.base_layer)
    configs = {k: v for k, v in adapter_configs(model).items() if k not in names}
    setattr(model, _CONFIGS, configs)
    return model


# ------------------------------------------------------------------------------------------ tensors
def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """The adapter's own tensors, keyed ``<layer path>.<tensor>`` (e.g. ``encoder.layer.0.query.lora_A``)."""
    _names(model, [name], [])
    out: dict[str, Tensor] = {}
    for path, lay in adapter_layers(model):
        if name in lay.adapters:
            for k, v in lay.adapters[name].state_dict().items():
                out[f"{path}.{k}"] = v.detach()
    return out


def load_adapter_state_(model: nn.Module, state: Mapping[str, Tensor], name: str = "default") -> nn.Module:
    """Copy ``state`` (as :func:`adapter_state_dict` gives it) into the adapter ``name``; every key and shape is
    checked first, so a file for another architecture or rank leaves the model unchanged."""
    own = adapter_state_dict(model, name)
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ConfigError(f"the adapter tensors do not fit adapter {name!r} of this model: missing {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}"
                          f". The file was made for another architecture or other targets; load it into the model "
                          "it was trained on")
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ShapeError(f"adapter tensor shapes differ (another rank?): {bad[:3]}; add the adapter with the rank "
                         "and targets it was trained with")
    merged = any(name in lay.merged for _, lay in adapter_layers(model))
    if merged:
        raise ConfigError(f"adapter {name!r} is merged; unmerge_ it before loading new tensors into it")
    with torch.no_grad():
        for path, lay in adapter_layers(model):
            if name in lay.adapters:
                sub = {k[len(path) + 1:]: v for k, v in state.items() if k.startswith(path + ".")
                       and k[len(path) + 1:] in lay.adapters[name].state_dict()}
                lay.adapters[name].load_state_dict(sub)
    return model


def adapter_report(model: nn.Module) -> dict[str, Any]:
    """Parameters and memory of each adapter beside the base model's (bytes at the parameters' dtypes)."""
    layers = adapter_layers(model)
    adapter_ids = {id(p) for _, lay in layers for p in lay.adapters.parameters()}
    base = [p for p in model.parameters() if id(p) not in adapter_ids]
    trainable = [p for p in model.parameters() if p.requires_grad]
    rows = {}
    for n, cfg in adapter_configs(model).items():
        ps = [p for _, lay in layers if n in lay.adapters for p in lay.adapters[n].parameters()]
        rows[n] = {"method": cfg.method, "rank": cfg.rank, "layers": sum(n in lay.adapters for _, lay in layers),
                   "parameters": sum(p.numel() for p in ps),
                   "trainable": sum(p.numel() for p in ps if p.requires_grad),
                   "bytes": sum(p.numel() * p.element_size() for p in ps),
                   "merged": any(n in lay.merged for _, lay in layers),
                   "active": any(n in lay.active for _, lay in layers)}
    n_train = sum(p.numel() for p in trainable)
    n_base = sum(p.numel() for p in base)
    return {"adapters": rows, "base_parameters": n_base, "trainable_parameters": n_train,
            "trainable_fraction": n_train / max(1, n_base + sum(r["parameters"] for r in rows.values())),
            # gradients + two Adam moments per trainable parameter, at the parameters' dtype
            "optimizer_state_bytes": sum(3 * p.numel() * p.element_size() for p in trainable)}
