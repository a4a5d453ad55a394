"""PEFT's LoRA file format as pure functions: tensor keys, pattern keys, target names, alphas, grouped convs.

:mod:`edgetune.adapters.io` does the model plumbing and the files; everything here maps names and tensors only.
PEFT's rules reproduced: a key is ``base_model.model.<module path>.lora_A.weight`` (``lora_embedding_A`` on an
embedding, ``lora_magnitude_vector`` for DoRA); ``target_modules`` names select a module equal to them or ending in
``.name``; a ``rank_pattern`` / ``alpha_pattern`` key is a regex matched against the end of a module path at a ``.``
boundary, the first matching key winning; a layer's scale is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["CONFIG_FILE", "MAGNITUDE", "PREFIX", "SUPPORTED", "WEIGHTS_FILE", "alpha_for_scale", "collapse_grouped",
           "expand_grouped", "magnitude_shape", "parse_peft_key", "pattern_key", "pattern_value", "peft_key",
           "peft_target_modules", "unsupported_options"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitude, on the adapter module and in PEFT's keys

# PEFT options whose effect edgetune's LoRA / DoRA cannot reproduce, with what each means
_REFUSED = {
    "fan_in_fan_out": "weights stored (in, out), as in GPT-2's Conv1D",
    "lora_bias": "a trained bias on lora_B",
    "modules_to_save": "whole modules trained beside the adapter",
    "trainable_token_indices": "trained embedding rows",
    "target_parameters": "LoRA on bare parameters",
    "layer_replication": "layers duplicated by the adapter",
    "use_qalora": "QA-LoRA on quantized layers",
    "megatron_config": "Megatron parallel layers",
    "alora_invocation_tokens": "activated LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
SUPPORTED = ("edgetune reads LORA files: plain LoRA or DoRA (use_dora) on linear, conv2d and embedding layers, "
             "with r, lora_alpha, use_rslora, rank_pattern, alpha_pattern and lora_dropout")


def peft_key(path: str, kind: str, part: str) -> str:
    """PEFT's key of one tensor: ``part`` is ``A``, ``B`` or ``M`` (DoRA's magnitude) of the layer at ``path``."""
    if part == "M":
        return f"{PREFIX}{path}.{MAGNITUDE}"
    if kind == "embedding":
        return f"{PREFIX}{path}.lora_embedding_{part}"
    return f"{PREFIX}{path}.lora_{part}.weight"


_KEY = re.compile(r"^(?P<path>.+?)\.(?:lora_(?P<ab>[AB])(?:\.(?P<n1>[\w-]+))?\.weight"
                  r"|lora_embedding_(?P<eab>[AB])(?:\.(?P<n2>[\w-]+))?"
                  rf"|{MAGNITUDE}(?:\.(?P<n3>[\w-]+))?(?:\.weight)?)$")


def parse_peft_key(key: str) -> tuple[str, str, bool, str | None] | None:
    """``(module path, part, embedding?, adapter name or None)`` of a PEFT key, or None when it is no LoRA tensor.

    Accepts keys with the adapter name inside (``lora_A.default.weight``, as older PEFT and raw state dicts
    have them). part: ``A``, ``B`` or ``M``.
    """
    if not key.startswith(PREFIX):
        return None
    m = _KEY.match(key[len(PREFIX):])
    if m is None:
        return None
    if m["ab"]:
        return m["path"], m["ab"], False, m["n1"]
    if m["eab"]:
        return m["path"], m["eab"], True, m["n2"]
    name = m["n3"]
    return m["path"], "M", False, None if name in (None, "weight") else name


def pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """The value PEFT takes from ``rank_pattern`` / ``alpha_pattern`` for the module at ``path``: the first key
    (a regex) that matches the end of the path at a ``.`` boundary, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def pattern_key(path: str, paths: Sequence[str]) -> str:
    """The ``rank_pattern`` / ``alpha_pattern`` key for ``path`` that PEFT matches to it alone among ``paths``: the
    path itself (as PEFT writes them) unless, read as PEFT's regex, it also matches another path; then anchored."""
    if any(re.match(rf"(.*\.)?({path})$", other) for other in paths if other != path):
        return "^" + re.escape(path)
    return path


def peft_target_modules(adapted: Sequence[str], modules: Sequence[str]) -> list[str]:
    """``target_modules`` that select exactly the ``adapted`` paths among ``modules`` under PEFT's rule (a name
    matches a path equal to it or ending in ``.name``): a layer's last name when every module of that name is
    adapted, else its full path."""
    chosen = set(adapted)
    out: set[str] = set()
    for path in adapted:
        last = path.rsplit(".", 1)[-1]
        same = [m for m in modules if m == last or m.endswith("." + last)]
        out.add(last if all(m in chosen for m in same) else path)
    return sorted(out)


def alpha_for_scale(scale: float, rank: int, rslora: bool = False) -> float:
    """An alpha whose PEFT scale (``alpha / r``, or ``alpha / sqrt(r)``) is ``scale``: exactly when a float does it
    (a whole number when one does), else the nearest (one float64 ulp away, the same once cast to float32)."""
    denom = math.sqrt(rank) if rslora else float(rank)
    alpha = scale * denom
    if float(round(alpha)) / denom == scale:
        return float(round(alpha))
    cands, lo, hi = [alpha], alpha, alpha
    for _ in range(16):  # a few ulps either side
        lo, hi = math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf)
        cands += [lo, hi]
    return min(cands, key=lambda c: abs(c / denom - scale))


def expand_grouped(a: Tensor, groups: int) -> Tensor:
    """edgetune's grouped-conv ``A`` ``(r, in/g, kh, kw)`` as PEFT's ``(g*r, in, kh, kw)``: block-diagonal."""
    r, cin = a.shape[0], a.shape[1]
    out = a.new_zeros(groups * r, groups * cin, *a.shape[2:])
    for j in range(groups):
        out[j * r:(j + 1) * r, j * cin:(j + 1) * cin] = a
    return out


def collapse_grouped(a: Tensor, groups: int) -> Tensor | None:
    """The inverse of :func:`expand_grouped`: the shared ``A`` when ``a`` has that block form, else None."""
    if a.shape[0] % groups or a.shape[1] % groups:
        return None
    r, cin = a.shape[0] // groups, a.shape[1] // groups
    first = a[:r, :cin].clone()
    return first if torch.equal(expand_grouped(first, groups), a) else None


def magnitude_shape(kind: str, out: int) -> tuple[int, ...]:
    return (1, out, 1, 1) if kind == "conv2d" else (out,)


def unsupported_options(conf: Mapping[str, Any]) -> list[str]:
    """The options of a LORA ``adapter_config.json`` that edgetune cannot honour, each with what it means."""
    out = [f"{k}={conf[k]!r} ({what})" for k, what in _REFUSED.items() if conf.get(k)]
    if conf.get("bias", "none") != "none":
        out.append(f"bias={conf['bias']!r} (trained biases of the base layers)")
    return out
