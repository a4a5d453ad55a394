"""Adapter files in Hugging Face PEFT's format, both ways: :func:`save_adapter` and :func:`load_adapter_`.

A folder holds two files, as ``PeftModel.save_pretrained`` writes them:

- ``adapter_config.json``: ``peft_type`` "LORA", ``task_type`` (when known), ``r``, ``lora_alpha``,
  ``use_rslora``, ``target_modules``, ``rank_pattern`` / ``alpha_pattern`` (layers whose rank or alpha differ),
  ``lora_dropout``, ``bias`` "none", ``fan_in_fan_out`` false, ``use_dora``, ``base_model_name_or_path``.
- ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``
  (``lora_embedding_A`` / ``lora_embedding_B`` on embeddings; DoRA adds ``.lora_magnitude_vector``, shaped
  ``(out,)``, or ``(1, out, 1, 1)`` on a convolution). edgetune's own block (method, full config, root) sits in the
  file's safetensors header under ``edgetune``: PEFT ignores header metadata, whereas an unknown key in
  ``adapter_config.json`` makes PEFT warn that the file comes from a newer PEFT and drop it.

Every method saves through its adapters' ``as_lora()``: a plain LoRA ``(A, B, scale)`` per layer, so a chain,
a gated SoRA or a DyLoRA is written as the LoRA it computes (DoRA keeps its magnitude and ``use_dora``). Layer
ranks may differ (``rank_pattern``); ``lora_alpha`` (and ``alpha_pattern``) are chosen so that PEFT's
``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) gives back each layer's scale exactly.

Module paths: for a plain ``nn.Module`` the path is the layer's name in the model. A model holding a Hugging Face
``PreTrainedModel`` (edgetune's pretrained loaders wrap one: ``FeatureEncoder.encoder``,
``FeatureClassifier.features.encoder``) is written relative to the outermost ``PreTrainedModel`` inside it, which
is what PEFT gives on that HF model alone: ``features.encoder.encoder.layer.0.attention.self.query`` becomes
``base_model.model.encoder.layer.0.attention.self.query`` and loads with ``PeftModel.from_pretrained`` on
``AutoModel.from_pretrained(...)``; a causal LM is its own root (``model.layers.0.self_attn.q_proj``). When an
adapted layer lies outside the HF model (a head), paths are relative to the whole model instead. Loading tries
the HF model's root, then the whole model.

A grouped convolution's LoRA (edgetune: one ``A`` ``(r, in/g, kh, kw)`` shared by the ``g`` groups) is written in
PEFT's grouped layout (``A`` over all input channels, ``(g*r, in, kh, kw)``, block-diagonal; ``B`` unchanged),
and read back when a file's ``A`` has that form. The name and tensor mapping is pure, in
:mod:`edgetune.adapters.peft_format`; this module walks the model and reads and writes the files.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from edgetune.adapters.config import ADAPTERS, AdapterConfig
from edgetune.adapters.layer import AdapterLayer, layer_info
from edgetune.adapters.lora import factor_shapes
from edgetune.adapters.model import (
    adapter_configs,
    adapter_layers,
    adapter_state_dict,
    add_adapter_,
    load_adapter_state_,
    remove_adapters_,
)
from edgetune.adapters.peft_format import (
    CONFIG_FILE,
    MAGNITUDE,
    SUPPORTED,
    WEIGHTS_FILE,
    alpha_for_scale,
    collapse_grouped,
    expand_grouped,
    magnitude_shape,
    parse_peft_key,
    pattern_key,
    pattern_value,
    peft_key,
    peft_target_modules,
    unsupported_options,
)
from edgetune.core.config import validate
from edgetune.core.errors import CheckpointError, ConfigError, ShapeError
from edgetune.core.state import atomic_write_bytes, save_tensors

__all__ = ["hf_root", "load_adapter_", "save_adapter"]

log = logging.getLogger(__name__)

_META = "edgetune"  # safetensors header key of edgetune's own block


# ------------------------------------------------------------------------------------------ model plumbing
def hf_root(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(path, module)`` of the outermost Hugging Face ``PreTrainedModel`` in ``model`` (itself included), or None.

    transformers is not imported here: a model can only hold one when it is loaded already.
    """
    tf = sys.modules.get("transformers")
    base = getattr(tf, "PreTrainedModel", None) if tf is not None else None
    if base is None:
        return None
    for path, m in model.named_modules():
        if isinstance(m, base):
            return path, m
    return None


def _logical_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Module paths as PEFT sees them on the plain model: an AdapterLayer stands for its base layer."""
    yield prefix, module
    if isinstance(module, AdapterLayer):
        return
    for name, child in module.named_children():
        yield from _logical_modules(child, f"{prefix}.{name}" if prefix else name)


def _strip(path: str, prefix: str) -> str:
    return path[len(prefix) + 1:] if prefix else path


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _task_type(root: nn.Module | None) -> str | None:
    name = type(root).__name__ if root is not None else ""
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith("Model") and "For" not in name:
        return "FEATURE_EXTRACTION"
    return None


# ------------------------------------------------------------------------------------------ save
def save_adapter(model: nn.Module, folder: str | Path, name: str = "default") -> list[Path]:
    """Write adapter ``name`` of ``model`` into ``folder`` in PEFT's format; return the files written."""
    cfg = adapter_configs(model).get(name)
    if cfg is None:
        raise ConfigError(f"the model has no adapter named {name!r}; its adapters: {list(adapter_configs(model))}")
    layers = [(p, lay) for p, lay in adapter_layers(model) if name in lay.adapters]
    dora = cfg.method == "dora"
    found = hf_root(model)
    prefix, root = found if found is not None else ("", None)
    if prefix and not all(p.startswith(prefix + ".") for p, _ in layers):
        log.warning("adapter %r has layers outside the Hugging Face model at %r; its file names paths from the whole "
                    "model, so PEFT on the plain Hugging Face model cannot load it", name, prefix)
        prefix, root = "", None
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, lay in layers:
        rel, info, ad = _strip(path, prefix), lay.info, lay.adapters[name]
        a, b, scale = (t.detach() if isinstance(t, Tensor) else t for t in ad.as_lora())
        if a.shape[0] == 0:  # a layer pruned to rank 0 (SoRA): no update, no entry
            continue
        if scale <= 0:  # PEFT's scale comes from a positive alpha: fold the sign into B
            b, scale = b * scale, 1.0
        if info.kind == "conv2d" and info.groups > 1:
            a = expand_grouped(a, info.groups)
        if info.kind == "conv2d" and tuple(info.dilation) != (1, 1):
            log.warning("%s: PEFT's LoRA on a convolution ignores its dilation %s; the file reloads in edgetune, but "
                        "PEFT would compute another update", path, tuple(info.dilation))
        ranks[rel] = a.shape[0]
        alphas[rel] = alpha_for_scale(float(scale), a.shape[0], cfg.rslora)
        tensors[peft_key(rel, info.kind, "A")] = a
        tensors[peft_key(rel, info.kind, "B")] = b
        if dora:
            mag = getattr(ad, MAGNITUDE)
            tensors[peft_key(rel, info.kind, "M")] = mag.detach().reshape(magnitude_shape(info.kind,
                                                                                            info.out_features))
    if not ranks:
        raise ConfigError(f"adapter {name!r} has no layer with a non-zero rank, so there is nothing to save")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    modules = [p for p, _ in _logical_modules(root if root is not None else model) if p]
    conf = {
        "peft_type": "LORA",
        "task_type": _task_type(root),
        "base_model_name_or_path": getattr(root, "name_or_path", None) or None,
        "r": r,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "use_rslora": cfg.rslora,
        "target_modules": peft_target_modules(list(ranks), modules),
        "rank_pattern": {pattern_key(p, list(ranks)): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {pattern_key(p, list(ranks)): (int(v) if v.is_integer() else v) for p, v in alphas.items()
                          if v != alpha},
        "lora_dropout": cfg.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": dora,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    block = {"format": 1, "method": cfg.method, "config": cfg.to_dict(), "root": prefix}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, conf_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    save_tensors(tensors, weights, metadata={"format": "pt", _META: json.dumps(block)})
    atomic_write_bytes(conf_path, (json.dumps(conf, indent=2) + "\n").encode())
    log.info("adapter %r (%s) saved to %s: %d layers, ranks %s", name, cfg.method, folder, len(ranks),
             sorted(set(ranks.values())))
    return [conf_path, weights]


# ------------------------------------------------------------------------------------------ load
def _read(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """The config, tensors and edgetune block of an adapter folder (clear errors for missing or damaged files)."""
    conf_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not conf_path.is_file():
        raise ConfigError(f"{folder} has no {CONFIG_FILE}, so it is not an adapter folder; point at the folder that "
                          "save_adapter or PEFT's save_pretrained wrote")
    if not weights.is_file():
        other = "; it has adapter_model.bin (pickle), which edgetune does not read" if (
            folder / "adapter_model.bin").is_file() else ""
        raise ConfigError(f"{folder} has no {WEIGHTS_FILE}{other}. Save the adapter with safetensors "
                          "(PEFT's default, safe_serialization=True)")
    try:
        conf = json.loads(conf_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{conf_path} is not readable JSON ({err})") from err
    if not isinstance(conf, dict):
        raise CheckpointError(f"{conf_path} holds a {type(conf).__name__}, not a JSON object")
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has keys(), no iteration)
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{weights} is not a readable safetensors file ({type(err).__name__}: {err})") from err
    try:
        block = json.loads(meta[_META]) if _META in meta else {}
    except ValueError:
        block = {}
    return conf, tensors, block


def _check_options(conf: Mapping[str, Any]) -> None:
    kind = conf.get("peft_type")
    if kind != "LORA":
        raise ConfigError(f"the adapter file is a PEFT {kind!r} adapter; {SUPPORTED}")
    refused = unsupported_options(conf)
    if refused:
        raise ConfigError(f"the LORA file uses options edgetune cannot honour: {'; '.join(refused)}. {SUPPORTED}")
    for key in ("r", "lora_alpha"):
        if not isinstance(conf.get(key, 8), (int, float)) or conf.get(key, 8) <= 0:
            raise ConfigError(f"the adapter file's {key} is {conf.get(key)!r}; it must be a positive number")


def _entries(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """Module path -> {"A", "B", "M": tensors, "embedding": bool}, from PEFT keys."""
    out: dict[str, dict[str, Any]] = {}
    foreign, names = [], set()
    for key, t in tensors.items():
        parsed = parse_peft_key(key)
        if parsed is None:
            foreign.append(key)
            continue
        path, part, emb, adapter = parsed
        names.add(adapter)
        e = out.setdefault(path, {"embedding": emb})
        if part != "M" and e["embedding"] != emb:
            raise ConfigError(f"the adapter file mixes embedding and linear LoRA keys for {path}")
        e[part] = t
    if foreign:
        raise ConfigError(f"the adapter file holds tensors that are not LoRA factors: {sorted(foreign)[:5]}"
                          f"{' ...' if len(foreign) > 5 else ''}. Full weights (PEFT's modules_to_save, or embeddings "
                          "saved with save_embedding_layers=True) cannot be loaded as an adapter; save the PEFT model "
                          "with save_embedding_layers=False, or load those weights into the model yourself")
    if len(names) > 1:
        raise ConfigError(f"the adapter file holds several adapters ({sorted(map(str, names))}); save each one alone")
    broken = [p for p, e in out.items() if "A" not in e or "B" not in e]
    if broken:
        raise ConfigError(f"the adapter file lacks lora_A or lora_B of {broken[:5]}; the file is incomplete")
    if not out:
        raise ConfigError("the adapter file holds no LoRA tensors")
    return out


def _resolve_root(model: nn.Module, paths: Sequence[str], hint: str | None) -> tuple[str, dict[str, nn.Module]]:
    """The prefix under which every file path names a module of ``model`` (the HF model's root first)."""
    found = hf_root(model)
    prefixes = list(dict.fromkeys([*([found[0]] if found else []), *([hint] if hint else []), ""]))
    modules = dict(_logical_modules(model))
    best: tuple[str, list[str]] | None = None
    for prefix in prefixes:
        missing = [p for p in paths if _join(prefix, p) not in modules]
        if not missing:
            return prefix, {p: modules[_join(prefix, p)] for p in paths}
        if best is None or len(missing) < len(best[1]):
            best = (prefix, missing)
    assert best is not None
    prefix, missing = best
    layers = [p for p, m in modules.items() if p and (isinstance(m, AdapterLayer) or layer_info(m) is not None)]
    raise ConfigError(f"the adapter file was made for another architecture: {len(missing)} of its {len(paths)} layers "
                      f"are not in this model{f' (under {prefix!r})' if prefix else ''}, first {missing[:5]}; this "
                      f"model's adaptable layers look like {layers[:5]}")


def _plan(conf: Mapping[str, Any], entries: Mapping[str, dict[str, Any]], modules: Mapping[str, nn.Module]
          ) -> dict[str, dict[str, Any]]:
    """Per file path: the layer info, edgetune's rank and scale, and the tensors in edgetune's layout."""
    rslora, dora = bool(conf.get("use_rslora", False)), bool(conf.get("use_dora", False))
    r0, alpha0 = conf.get("r", 8), conf.get("lora_alpha", 8)
    ranks, alphas = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}
    plan: dict[str, dict[str, Any]] = {}
    kinds, shapes, bad_rank = [], [], []
    for path, e in entries.items():
        m = modules[path]
        info = m.info if isinstance(m, AdapterLayer) else layer_info(m)
        if info is None:
            kinds.append(f"{path} ({type(m).__name__})")
            continue
        a, b = e["A"], e["B"]
        if e["embedding"] != (info.kind == "embedding"):
            shapes.append(f"{path}: {'embedding' if e['embedding'] else 'linear/conv'} LoRA keys on a {info.kind} "
                          "layer")
            continue
        peft_rank = a.shape[0]
        want = pattern_value(ranks, path, r0)
        if want != peft_rank:
            bad_rank.append(f"{path}: config rank {want}, tensors rank {peft_rank}")
        scale = pattern_value(alphas, path, alpha0) / (math.sqrt(peft_rank) if rslora else peft_rank)
        if info.kind == "conv2d" and info.groups > 1 and a.dim() == 4:
            shared = collapse_grouped(a, info.groups)
            if shared is None:
                shapes.append(f"{path}: grouped conv (groups={info.groups}) LoRA A {tuple(a.shape)} is not edgetune's "
                              "block form (one A shared by the groups)")
                continue
            a = shared
        rank = a.shape[0]
        sa, sb = factor_shapes(info, rank)
        if tuple(a.shape) != sa or tuple(b.shape) != sb:
            shapes.append(f"{path}: file A {tuple(a.shape)}, B {tuple(b.shape)} vs layer A {sa}, B {sb}")
            continue
        mag = e.get("M")
        if dora != (mag is not None) or (mag is not None and mag.numel() != info.out_features):
            shapes.append(f"{path}: DoRA magnitude {None if mag is None else tuple(mag.shape)} vs use_dora={dora} and "
                          f"{info.out_features} outputs")
            continue
        plan[path] = {"info": info, "rank": rank, "scale": scale, "A": a, "B": b, "M": mag}
    if kinds:
        raise ConfigError(f"the adapter file puts LoRA on module kinds edgetune lacks: {kinds[:5]}; {SUPPORTED}")
    if bad_rank:
        raise ConfigError(f"the adapter file is inconsistent (its config's ranks differ from its tensors'): "
                          f"{bad_rank[:3]}")
    if shapes:
        raise ShapeError(f"the adapter file does not fit this model's layers (another architecture or size?): "
                         f"{len(shapes)} mismatches, first {shapes[:3]}")
    return plan


def _new_config(name: str, conf: Mapping[str, Any], plan: Mapping[str, dict[str, Any]], prefix: str
                ) -> AdapterConfig:
    """A ``lora`` / ``dora`` config that rebuilds exactly the file's layers, ranks and scales."""
    method = "dora" if conf.get("use_dora") else "lora"
    if method not in ADAPTERS:
        raise ConfigError("the adapter file is a DoRA adapter (use_dora=true), and this edgetune has no dora method")
    rslora = bool(conf.get("use_rslora", False))
    per = {_join(prefix, p): (e["rank"], alpha_for_scale(e["scale"], e["rank"], rslora)) for p, e in plan.items()}
    r = Counter(v[0] for v in per.values()).most_common(1)[0][0]
    alpha = Counter(v[1] for v in per.values()).most_common(1)[0][0]
    return validate(AdapterConfig, {
        "method": method, "name": name, "rank": r, "alpha": alpha, "rslora": rslora, "targets": list(per),
        "kinds": sorted({e["info"].kind for e in plan.values()}), "dropout": float(conf.get("lora_dropout") or 0.0),
        "rank_pattern": {p: v[0] for p, v in per.items() if v[0] != r},
        "alpha_pattern": {p: v[1] for p, v in per.items() if v[1] != alpha}}, where="the adapter file's options")


def _check_existing(model: nn.Module, name: str, cfg: AdapterConfig, conf: Mapping[str, Any],
                    plan: Mapping[str, dict[str, Any]], prefix: str) -> None:
    """Loading into an adapter the model has already: same method, layers, shapes and scales."""
    method = "dora" if conf.get("use_dora") else "lora"
    if cfg.method != method:
        raise ConfigError(f"the model's adapter {name!r} is {cfg.method}, the file holds a plain {method}; load it "
                          "under a new name (name=...) or remove the adapter first")
    layers = {p: lay for p, lay in adapter_layers(model) if name in lay.adapters}
    want = {_join(prefix, p) for p in plan}
    if set(layers) != want:
        raise ConfigError(f"the file's layers differ from adapter {name!r}'s: only in the file "
                          f"{sorted(want - set(layers))[:3]}, only in the model {sorted(set(layers) - want)[:3]}")
    shapes, scales = [], []
    for p, e in plan.items():
        ad = layers[_join(prefix, p)].adapters[name]
        if tuple(ad.lora_A.shape) != tuple(e["A"].shape) or tuple(ad.lora_B.shape) != tuple(e["B"].shape):
            shapes.append(f"{p}: file A {tuple(e['A'].shape)} vs adapter A {tuple(ad.lora_A.shape)}")
        elif not math.isclose(ad.scale, e["scale"], rel_tol=1e-9):
            scales.append(f"{p}: file {e['scale']:g} vs adapter {ad.scale:g}")
    if shapes:
        raise ShapeError(f"the file's tensors do not fit adapter {name!r} (another rank?): {shapes[:3]}; load it "
                         "under a new name to get the file's ranks")
    if scales:
        raise ConfigError(f"the file's scales (alpha / r) differ from adapter {name!r}'s: {scales[:3]}")


def load_adapter_(model: nn.Module, folder: str | Path, name: str = "default", *, freeze: bool = True
                  ) -> nn.Module:
    """Add the adapter saved in ``folder`` (by :func:`save_adapter` or PEFT's ``save_pretrained``) to ``model``
    under ``name``, with the file's layers, ranks and scales; return the model.

    The file becomes a ``lora`` adapter (``dora`` with ``use_dora``), whatever method trained it. When the model
    already has an adapter ``name`` of that method on the same layers and ranks, its tensors are replaced instead.
    Everything is checked before the model changes: a file of another PEFT type or with options edgetune cannot
    honour raises :class:`ConfigError`, one for another architecture names the missing layers, one whose shapes
    differ raises :class:`ShapeError`. ``freeze`` (new adapter): only its factors stay trainable.
    """
    folder = Path(folder)
    conf, tensors, block = _read(folder)
    _check_options(conf)
    entries = _entries(tensors)
    prefix, modules = _resolve_root(model, list(entries), block.get("root"))
    plan = _plan(conf, entries, modules)
    existing = adapter_configs(model).get(name)
    if existing is not None:
        _check_existing(model, name, existing, conf, plan, prefix)
    cfg = existing if existing is not None else _new_config(name, conf, plan, prefix)
    grads = {id(p): p.requires_grad for p in model.parameters()}
    if existing is None:
        add_adapter_(model, cfg, freeze=freeze)
    try:
        state = adapter_state_dict(model, name)  # every key, so parts the file lacks keep their values
        for p, e in plan.items():
            full = _join(prefix, p)
            state[f"{full}.lora_A"], state[f"{full}.lora_B"] = e["A"], e["B"]
            if e["M"] is not None:
                key = f"{full}.{MAGNITUDE}"
                if key not in state:
                    raise ConfigError(f"edgetune's {cfg.method} adapter has no {MAGNITUDE} to load DoRA's magnitude "
                                      "into")
                state[key] = e["M"].reshape(state[key].shape)
        load_adapter_state_(model, state, name)
    except BaseException:
        if existing is None:  # take the new adapter off again: the model is as it was
            remove_adapters_(model, name)
            for p in model.parameters():
                p.requires_grad_(grads.get(id(p), p.requires_grad))
        raise
    log.info("adapter %r loaded from %s: %d layers%s%s", name, folder, len(plan),
             f" under {prefix!r}" if prefix else "", f" (trained as {block['method']})" if block.get("method") else "")
    return model
