"""Read mergekit's YAML (``merge_method``, ``models``, ``base_model``, ``parameters``, ``dtype``) as an edgetune job.

For the methods edgetune shares with mergekit, a mergekit user's file runs unchanged with ``edgetune merge FILE
--out DIR`` (mergekit's ``mergekit-yaml FILE DIR``). Each key edgetune does not support stops the read with its name
and the reason, before anything is written; nothing is silently dropped except ``int8_mask`` (a memory option of
mergekit's with no effect on the result).

Method by method (mergekit name -> edgetune):

- ``linear`` -> ``linear`` (``weight`` per model, ``normalize``, default true). As in mergekit, a ``base_model``
  is averaged like any other model: list it in ``models`` with its weight (mergekit refuses it otherwise);
- ``task_arithmetic`` -> ``task_arithmetic`` (``weight``, ``lambda`` -> ``scaling``; ``normalize: true``, off by
  default in mergekit, divides the weights by their sum);
- ``ties`` -> ``ties`` (``density`` per model, default 1 as in mergekit; ``normalize`` -> ``disjoint_mean``);
- ``dare_linear`` / ``dare_ties`` -> ``dare`` with ``combine: sum`` / ``ties``. mergekit rescales the kept entries
  so the task vector keeps its L1 norm; edgetune by ``1 / density`` as the DARE paper does (equal in expectation;
  ``rescale: false`` is not supported);
- ``breadcrumbs`` -> ``breadcrumbs`` (``gamma`` -> ``beta``, cut to ``1 - density`` where the two pass 1, as
  mergekit's counts do);
- ``model_stock`` -> ``model_stock`` (per tensor, mergekit's ``filter_wise: false``).

Known differences, measured against mergekit 0.1.5 by ``scripts/compare_mergekit.py``
(``bench/results/merging-mergekit-parity.md``; everything else agrees to float32 rounding or exactly):

- edgetune keeps ``round(density * n)`` entries where mergekit keeps ``int(density * n)`` (TIES, breadcrumbs);
- where the elected sign's mass is exactly zero, TIES keeps nothing where mergekit counts it positive;
- TIES's disjoint mean divides by the sum of ``|w_i|`` over the agreeing models, mergekit by the signed sum: they
  differ only with negative weights;
- ``dtype`` is the output dtype here; mergekit also computes in it (edgetune computes in float32), about one
  bfloat16 rounding step apart;
- model_stock: a mean cosine below 0 gives the base here (ratio clamped to [0, 1]); mergekit extrapolates;
- DARE's rescaling (above). The per-model ``density``/``gamma`` must be one value for all models (edgetune's
  configs take one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgetune.core.errors import ConfigError, did_you_mean

__all__ = ["SUPPORTED", "from_mergekit"]

log = logging.getLogger(__name__)

#: mergekit method -> (edgetune method, fixed options)
SUPPORTED: dict[str, tuple[str, dict[str, Any]]] = {
    "linear": ("linear", {}),
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "dare_linear": ("dare", {"combine": "sum"}),
    "dare_ties": ("dare", {"combine": "ties"}),
    "breadcrumbs": ("breadcrumbs", {}),
    "model_stock": ("model_stock", {}),
}
#: mergekit's default of ``normalize`` per method
_NORMALIZE = {"linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False,
              "breadcrumbs": False}
#: per-model parameters each method reads (``weight`` is per model everywhere but in model_stock)
_PER_MODEL = {"linear": {"weight"}, "task_arithmetic": {"weight"}, "ties": {"weight", "density"},
              "dare_linear": {"weight", "density"}, "dare_ties": {"weight", "density"},
              "breadcrumbs": {"weight", "density", "gamma"}, "model_stock": set()}
_GLOBAL = {"linear": {"normalize"}, "task_arithmetic": {"normalize", "lambda"},
           "ties": {"normalize", "lambda"}, "dare_linear": {"normalize", "lambda", "rescale"},
           "dare_ties": {"normalize", "lambda", "rescale"}, "breadcrumbs": {"normalize", "lambda"},
           "model_stock": {"filter_wise"}}
_TOP = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source"}
_NOT_SUPPORTED_TOP = {
    "slices": "layer slices (frankenmerges) are not supported: edgetune merges models of one architecture whole",
    "modules": "per-module definitions are not supported: give one `models:` list",
    "tokenizer": "tokenizer merging is not supported: the merged folder gets the reference model's tokenizer files",
    "chat_template": "chat templates are not set by edgetune merge: edit the merged folder's tokenizer_config.json",
}


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a list (a gradient over layers)" if isinstance(value, list) else (
            "a mapping (a filtered value)" if isinstance(value, Mapping) else type(value).__name__)
        raise ConfigError(f"{where}: {key} is {kind}; edgetune takes one number per parameter (per-layer gradients "
                          "and filtered values are not supported)")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {key} = {value!r} is not a finite number")
    return float(value)


def _model_ref(ref: Any, where: str) -> str:
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}: a model must be a path (string), got {ref!r}")
    if "+" in ref and not Path(ref).exists():
        raise ConfigError(f"{where}: {ref!r} applies a LoRA to a model (mergekit's MODEL+LORA); edgetune does not; "
                          "merge the LoRA first (edgetune export RUN --format adapter-merged) and give that folder")
    if not Path(ref).expanduser().exists() and ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        raise ConfigError(f"{where}: {ref!r} is not a local path. edgetune reads local files only and downloads "
                          f"nothing: fetch it first (huggingface-cli download {ref} --local-dir DIR) and give DIR")
    return ref


def _bool(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def from_mergekit(data: Mapping[str, Any], where: str = "mergekit config") -> dict[str, Any]:
    """A mergekit configuration as an edgetune job mapping (see :func:`edgetune.merging.job.load_job`)."""
    for key, why in _NOT_SUPPORTED_TOP.items():
        if key in data:
            raise ConfigError(f"{where}: `{key}` is not supported by edgetune merge: {why}")
    unknown = [k for k in data if k not in _TOP and k not in ("output",)]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}.{did_you_mean(unknown[0], _TOP)} mergekit keys "
                          f"edgetune reads: {', '.join(sorted(_TOP))}")
    method = str(data["merge_method"]).lower()
    if method not in SUPPORTED:
        raise ConfigError(f"{where}: merge_method {method!r} is not supported by edgetune.{did_you_mean(method, SUPPORTED)}"
                          f" mergekit methods edgetune runs: {', '.join(SUPPORTED)}")
    ours, fixed = SUPPORTED[method]
    ts = data.get("tokenizer_source")
    if ts not in (None, "base"):
        raise ConfigError(f"{where}: tokenizer_source {ts!r} is not supported: the merged folder gets the tokenizer "
                          "files of the base model (or of the first model without a base); leave tokenizer_source "
                          "out or set it to base")
    base = _model_ref(data["base_model"], f"{where}, base_model") if data.get("base_model") else None
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: `models` must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    models: list[dict[str, Any]] = []
    per_model: dict[str, list[float]] = {}
    for i, entry in enumerate(entries):
        at = f"{where}, models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise ConfigError(f"{at}: each model must be {{model: PATH, parameters: {{...}}}}")
        extra = [k for k in entry if k not in ("model", "parameters")]
        if extra:
            raise ConfigError(f"{at}: unknown key {extra[0]!r}; a model entry has model and parameters")
        ref = _model_ref(entry["model"], at)
        params = dict(entry.get("parameters") or {})
        if base is not None and ref == base and method != "linear":  # listed too; task-vector methods skip it
            continue
        for key, value in params.items():
            if key not in _PER_MODEL[method]:
                raise ConfigError(f"{at}: parameter {key!r} is not supported for {method}; parameters per model "
                                  f"there: {', '.join(sorted(_PER_MODEL[method])) or '(none)'}")
            per_model.setdefault(key, []).append(_number(value, key, at))
        models.append({"model": ref, "n_params": params})
    if not models:
        raise ConfigError(f"{where}: every model is the base model; list the fine-tuned models to merge")
    globals_ = dict(data.get("parameters") or {})
    for key in [k for k in globals_ if k in _PER_MODEL[method]]:  # a default for the models that lack it
        value = _number(globals_.pop(key), key, where)
        per_model[key] = [_number(m["n_params"][key], key, where) if key in m["n_params"] else value for m in models]
    for key in globals_:
        if key == "int8_mask":
            log.info("mergekit's int8_mask is a memory option with no effect on the result: ignored")
            continue
        if key not in _GLOBAL[method]:
            raise ConfigError(f"{where}: parameter {key!r} is not supported for {method}; global parameters there: "
                              f"{', '.join(sorted(_GLOBAL[method]))}")
    if method == "linear" and base is not None and base not in [m["model"] for m in models]:
        raise ConfigError(f"{where}: linear averages base_model {base!r} like the other models (as mergekit does), so "
                          "it needs a weight: list it in models with parameters: {weight: W}, or remove base_model")
    out: dict[str, Any] = {"method": ours, **fixed}
    if base is not None and method != "linear":
        out["base"] = base
    weights = per_model.get("weight")
    if weights is not None and len(weights) != len(models):
        raise ConfigError(f"{where}: {len(weights)} of {len(models)} models have a weight; give every model one")
    if method != "model_stock" and weights is None:
        weights = [1.0] * len(models)  # mergekit requires a weight; a missing one is 1 here
    normalize = _bool(globals_.get("normalize", _NORMALIZE.get(method, False)), "normalize", where)
    if method in ("task_arithmetic", "dare_linear", "breadcrumbs") and normalize and weights:
        total = sum(weights)
        if abs(total) < 1e-8:
            raise ConfigError(f"{where}: normalize divides by the sum of the weights, which is 0; give other weights "
                              "or normalize: false")
        weights = [w / total for w in weights]
    if method == "linear":
        out["normalize"] = normalize
    if method in ("ties", "dare_ties"):
        out["disjoint_mean"] = normalize
    if weights is not None:
        out["weights"] = weights
    for key, ours_key in (("density", "density"), ("gamma", "beta")):
        values = per_model.get(key)
        if values:
            if len(set(values)) > 1 or len(values) != len(models):
                raise ConfigError(f"{where}: {key} differs between models ({values}); edgetune takes one {key} for "
                                  "all models: give them the same value")
            out[ours_key] = values[0]
    if "density" in _PER_MODEL[method] and "density" not in out:
        out["density"] = 1.0  # mergekit's default (edgetune's own defaults are the papers')
    if method == "breadcrumbs" and out["density"] >= 1:
        out["beta"] = 0.0  # mergekit keeps every entry at density 1, gamma or not
    elif method == "breadcrumbs" and out.get("beta", 0.01) + out["density"] > 1:
        out["beta"] = 1.0 - out["density"]  # mergekit removes fewer outliers to keep `density` of the entries
    if "lambda" in globals_:
        out["scaling"] = _number(globals_["lambda"], "lambda", where)
    if "rescale" in globals_ and not _bool(globals_["rescale"], "rescale", where):
        raise ConfigError(f"{where}: rescale: false (DARE without rescaling) is not supported; edgetune's DARE "
                          "rescales the kept entries by 1/density")
    if "filter_wise" in globals_ and _bool(globals_["filter_wise"], "filter_wise", where):
        raise ConfigError(f"{where}: filter_wise: true is not supported; edgetune's model_stock works per tensor "
                          "(filter_wise: false)")
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        out["dtype"] = str(dtype)
    out["models"] = [m["model"] for m in models]
    if "output" in data:
        out["output"] = data["output"]
    if method in ("dare_linear", "dare_ties"):
        log.info("%s: edgetune rescales DARE's kept entries by 1/density (the paper's rule); mergekit matches the L1 "
                 "norm instead: results differ slightly", where)
    return out
