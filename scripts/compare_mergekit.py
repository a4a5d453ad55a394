#!/usr/bin/env python
"""Parity of ``edgetune merge`` with mergekit on the same mergekit YAML (issue 15).

Builds tiny Hugging Face Llama folders (a base and fine-tunes = base + structured noise), writes one mergekit YAML
per case, merges it with mergekit (its Python API, ``mergekit.merge.run_merge``, on the CPU) and with edgetune
(the command ``edgetune merge FILE --out DIR``, or with ``--in-process`` what it runs: ``load_job(FILE, output=DIR)``
+ ``run_merge``), and compares the merged safetensors tensor by tensor. DARE is random in both (and rescales
differently: mergekit to the task vector's L1 norm, edgetune by 1/density), so its rows compare statistics.
Where a documented difference is expected (edgetune keeps round(d*n) entries, mergekit int(d*n)), the edgetune
side is re-run in this process with that one rule swapped for mergekit's, to show it is the whole difference.

mergekit is NOT a dependency of edgetune: install it outside the project and point ``--mergekit-site`` at it::

    .venv/bin/python -m pip download mergekit --no-deps -d /tmp/mk-dl
    .venv/bin/python -m pip install --target /tmp/mk-site --no-deps /tmp/mk-dl/mergekit-*.whl immutables
    .venv/bin/python scripts/compare_mergekit.py --mergekit-site /tmp/mk-site \
        --out bench/results/merging-mergekit-parity.md

Nothing in the library or the tests imports this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mergekit-site", default="/tmp/mk-site",
                   help="folder holding the mergekit package (pip install --target ...); appended to sys.path")
    p.add_argument("--out", default="bench/results/merging-mergekit-parity.md", help="markdown results file")
    p.add_argument("--work", default="/tmp/mk-parity", help="scratch folder for the models, YAMLs and merges")
    p.add_argument("--in-process", action="store_true",
                   help="run edgetune's load_job + run_merge in this process (faster) instead of the command "
                        "`edgetune merge FILE --out DIR` per case")
    p.add_argument("--edgetune-src", default="",
                   help="import edgetune from this src/ folder instead of the installed one; HEAD: a snapshot of "
                        "the checkout's committed src/ (git archive HEAD), away from edits in progress")
    p.add_argument("--only", default="", help="comma-separated case ids to run (default: all)")
    return p.parse_args()


ARGS = _args()
SNAPSHOT = ""  # the commit of the src/ snapshot edgetune runs from, if any
if ARGS.edgetune_src == "HEAD":
    import subprocess

    _root = Path(__file__).resolve().parents[1]
    SNAPSHOT = subprocess.run(["git", "-C", str(_root), "rev-parse", "--short=8", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    _snap = Path(ARGS.work).with_name(Path(ARGS.work).name + f"-edgetune-{SNAPSHOT}")
    if not _snap.exists():
        _snap.mkdir(parents=True)
        _tar = subprocess.run(["git", "-C", str(_root), "archive", SNAPSHOT, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(_snap)], input=_tar.stdout, check=True)
    ARGS.edgetune_src = str(_snap / "src")
if ARGS.edgetune_src:
    _src = str(Path(ARGS.edgetune_src).resolve())
    sys.path.insert(0, _src)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_src, os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("TQDM_DISABLE", "1")  # mergekit's shard writer ignores quiet=True
_site = Path(ARGS.mergekit_site).expanduser()
if _site.is_dir():
    sys.path.append(str(_site))  # appended: the venv's torch/transformers/numpy always win
if importlib.util.find_spec("mergekit") is None:
    sys.exit(f"mergekit is missing: no `mergekit` package in {_site} nor in this Python ({sys.executable}).\n"
             "Install it outside the project:\n"
             "  .venv/bin/python -m pip download mergekit --no-deps -d /tmp/mk-dl\n"
             "  .venv/bin/python -m pip install --target /tmp/mk-site --no-deps /tmp/mk-dl/mergekit-*.whl immutables\n"
             "then pass --mergekit-site /tmp/mk-site")


import contextlib
import datetime as dt
import importlib.metadata as md
import math
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

HIDDEN, LAYERS, VOCAB, INTER, HEADS = 64, 2, 128, 128, 4
WORK = Path(ARGS.work)
FT_NAMES = ("ft_a", "ft_b", "ft_c")


# ---------------------------------------------------------------------------------------------------- the models
def make_models(work: Path) -> dict[str, str]:
    """base, ft_a/b/c (base + shared direction + own noise + a few large outliers) and ft_neg_a = base - tau_a."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                      max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    paths = {"base": str(work / "base")}
    base.save_pretrained(paths["base"], safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    shared = {k: torch.randn(v.shape, generator=g) for k, v in base_sd.items()}
    taus: dict[str, dict[str, torch.Tensor]] = {}
    for name in FT_NAMES:
        tau = {}
        for k, v in base_sd.items():
            own = torch.randn(v.shape, generator=g)
            outlier = (torch.rand(v.shape, generator=g) < 0.01) * torch.randn(v.shape, generator=g) * 8
            tau[k] = 0.01 * (0.6 * shared[k] + own + outlier)
        taus[name] = tau
    variants = {**{n: taus[n] for n in FT_NAMES}, "ft_neg_a": {k: -t for k, t in taus["ft_a"].items()}}
    for name, tau in variants.items():
        m = LlamaForCausalLM(cfg).eval()
        m.load_state_dict({k: base_sd[k] + tau[k] for k in base_sd})
        paths[name] = str(work / name)
        m.save_pretrained(paths[name], safe_serialization=True)
    return paths


# ---------------------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    id: str
    method: str
    options: str  # for the table
    doc: dict[str, Any]  # the mergekit YAML
    kind: str = "exact"  # exact | stats (DARE) | refused (edgetune is expected to refuse)
    explain: str | None = None  # a patch of edgetune's rules that should make it equal to mergekit
    note: str = ""
    models: tuple[str, ...] = FT_NAMES


def cases(p: dict[str, str]) -> list[Case]:
    def doc(method: str, per_model: list[dict[str, Any]] | dict[str, Any] | None = None, base: bool = True,
            globals_: dict[str, Any] | None = None, models: tuple[str, ...] = FT_NAMES,
            extra: list[dict[str, Any]] | None = None, **top: Any) -> dict[str, Any]:
        pm = per_model if isinstance(per_model, list) else [per_model or {}] * len(models)
        entries = [{"model": p[m], **({"parameters": dict(q)} if q else {})} for m, q in zip(models, pm, strict=True)]
        d: dict[str, Any] = {"merge_method": method, "models": entries + (extra or [])}
        if base:
            d["base_model"] = p["base"]
        if globals_:
            d["parameters"] = globals_
        d.update(top)
        return d

    w3 = [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]
    c: list[Case] = [
        Case("lin-1", "linear", "weights .5/.3/.2 (normalize default true), no base_model", doc("linear", w3, base=False)),
        Case("lin-2", "linear", "weights 1/.6/.4, normalize: false",
             doc("linear", [{"weight": 1.0}, {"weight": 0.6}, {"weight": 0.4}], base=False,
                 globals_={"normalize": False})),
        Case("lin-3", "linear", "weights 1/1/1, base_model also listed in models (weight 1)",
             doc("linear", {"weight": 1.0}, extra=[{"model": p["base"], "parameters": {"weight": 1.0}}]),
             explain="base-as-input"),
        Case("lin-4", "linear", "weights 1/1/1, base_model given but not listed in models",
             doc("linear", {"weight": 1.0}),
             note="mergekit adds base_model to the inputs of every method (plan.py normalize_config) and linear "
                  "ignores nothing, so it wants a weight for it; edgetune averages the 3 listed fine-tunes"),
        Case("lin-5", "linear", "weights .5/.3/.2, dtype: bfloat16", doc("linear", w3, base=False, dtype="bfloat16"),
             explain="bf16-inputs"),
        Case("ta-1", "task_arithmetic", "weights 1/.5/.7",
             doc("task_arithmetic", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.7}])),
        Case("ta-2", "task_arithmetic", "weights 1/.5/.7, normalize: true, lambda: 0.6",
             doc("task_arithmetic", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.7}],
                 globals_={"normalize": True, "lambda": 0.6})),
        Case("ta-3", "task_arithmetic", "weights 1/-.5/.7 (a negative weight)",
             doc("task_arithmetic", [{"weight": 1.0}, {"weight": -0.5}, {"weight": 0.7}])),
        Case("ta-4", "task_arithmetic", "weights 1/.5/.7, dtype: bfloat16",
             doc("task_arithmetic", [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.7}], dtype="bfloat16"),
             explain="bf16-inputs"),
        Case("ties-1", "ties", "density 0.5 (d*n whole for every tensor), weights 1",
             doc("ties", {"weight": 1.0, "density": 0.5})),
        Case("ties-2", "ties", "density 0.3 (d*n fractional: round vs int), weights 1",
             doc("ties", {"weight": 1.0, "density": 0.3}), explain="int-counts"),
        Case("ties-3", "ties", "density 0.5, weights 1/.5/.7, normalize: false, lambda: 0.8",
             doc("ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5},
                          {"weight": 0.7, "density": 0.5}], globals_={"normalize": False, "lambda": 0.8})),
        Case("ties-4", "ties", "density 0.5, weights 1/-.5/.7 (a negative weight), normalize default",
             doc("ties", [{"weight": 1.0, "density": 0.5}, {"weight": -0.5, "density": 0.5},
                          {"weight": 0.7, "density": 0.5}]), explain="signed-divisor"),
        Case("ties-5", "ties", "no density (default 1: no trim), weights 1", doc("ties", {"weight": 1.0})),
        Case("ties-6", "ties", "ft_a and ft_neg_a (opposite task vectors: zero sign mass), density 0.5, weights 1",
             doc("ties", {"weight": 1.0, "density": 0.5}, models=("ft_a", "ft_neg_a")), explain="zero-mass-positive",
             models=("ft_a", "ft_neg_a")),
        Case("dl-1", "dare_linear", "density 1 (no drop), weights 1/.5/.7",
             doc("dare_linear", [{"weight": 1.0, "density": 1.0}, {"weight": 0.5, "density": 1.0},
                                 {"weight": 0.7, "density": 1.0}])),
        Case("dl-2", "dare_linear", "density 0.3, weights 1", doc("dare_linear", {"weight": 1.0, "density": 0.3}),
             kind="stats"),
        Case("dl-3", "dare_linear", "density 0.3, one model (ft_a), weight 1",
             doc("dare_linear", {"weight": 1.0, "density": 0.3}, models=("ft_a",)), kind="stats", models=("ft_a",)),
        Case("dl-4", "dare_linear", "density 0.5, weights 1/.5/.7, normalize: true",
             doc("dare_linear", [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5},
                                 {"weight": 0.7, "density": 0.5}], globals_={"normalize": True}), kind="stats"),
        Case("dt-1", "dare_ties", "density 1 (no drop), weights 1 (normalize default false)",
             doc("dare_ties", {"weight": 1.0, "density": 1.0})),
        Case("dt-2", "dare_ties", "density 0.3, weights 1", doc("dare_ties", {"weight": 1.0, "density": 0.3}),
             kind="stats"),
        Case("dt-3", "dare_ties", "density 0.5, weights 1, normalize: true",
             doc("dare_ties", {"weight": 1.0, "density": 0.5}, globals_={"normalize": True}), kind="stats"),
        Case("bc-1", "breadcrumbs", "density 0.75, gamma 0.0625 (counts whole), weights 1",
             doc("breadcrumbs", {"weight": 1.0, "density": 0.75, "gamma": 0.0625})),
        Case("bc-2", "breadcrumbs", "density 0.8, gamma 0.05 (counts fractional), weights 1",
             doc("breadcrumbs", {"weight": 1.0, "density": 0.8, "gamma": 0.05}), explain="int-counts"),
        Case("bc-3", "breadcrumbs", "density 0.9, gamma default (0.01), weights 1/.5/.7, lambda 0.7",
             doc("breadcrumbs", [{"weight": 1.0, "density": 0.9}, {"weight": 0.5, "density": 0.9},
                                 {"weight": 0.7, "density": 0.9}], globals_={"lambda": 0.7}), explain="int-counts"),
        Case("bc-4", "breadcrumbs", "density 0.95, gamma 0.1 (density + gamma > 1)",
             doc("breadcrumbs", {"weight": 1.0, "density": 0.95, "gamma": 0.1}), kind="refused",
             note="mergekit merges it: n_bot = max(0, n − int(d·n) − int(g·n)) = 0, so it keeps the int(d·n) "
                  "smallest magnitudes and drops only the top n − int(d·n) (gamma cut to 1 − density)"),
        Case("ms-1", "model_stock", "3 fine-tunes", doc("model_stock")),
        Case("ms-2", "model_stock", "2 fine-tunes (ft_a, ft_b)", doc("model_stock", models=("ft_a", "ft_b")),
             models=("ft_a", "ft_b")),
        Case("ms-3", "model_stock", "ft_a, ft_b, ft_neg_a (mean cosine < 0)",
             doc("model_stock", models=("ft_a", "ft_b", "ft_neg_a")), explain="unclamped-cos",
             models=("ft_a", "ft_b", "ft_neg_a")),
    ]
    only = {s.strip() for s in ARGS.only.split(",") if s.strip()}
    return [x for x in c if not only or x.id in only]


# ---------------------------------------------------------------------------------------------------- running
def run_mergekit(cfg_path: Path, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    conf = MergeConfiguration.model_validate(yaml.safe_load(cfg_path.read_text()))
    run_merge(conf, str(out), MergeOptions(cuda=False, lazy_unpickle=False, copy_tokenizer=False, random_seed=0,
                                           write_model_card=False, quiet=True))


@contextlib.contextmanager
def edgetune_rules(explain: str | None) -> Iterator[None]:
    """edgetune with one of its documented rules swapped for mergekit's (restored on exit)."""
    import edgetune.merging.breadcrumbs as bc
    import edgetune.merging.model_stock as ms
    from edgetune.merging import ties

    saved = (ties.count_of, bc.count_of, ties.elect_and_mean, ms.model_stock_ratio)
    try:
        if explain == "int-counts":  # mergekit: int(d * n) kept entries
            def int_count(fraction: float, n: int) -> int:
                return min(n, max(0, int(fraction * n)))
            ties.count_of = bc.count_of = int_count
        elif explain in ("signed-divisor", "zero-mass-positive"):
            def mergekit_elect(base: torch.Tensor, taus: Any, weights: Any, scaling: float, elect_sign: bool = True,
                               disjoint_mean: bool = True) -> torch.Tensor:
                w = torch.tensor(list(weights), dtype=base.dtype).view(-1, *([1] * base.dim()))
                weighted = torch.stack(list(taus)) * w
                mass = weighted.sum(0)
                if explain == "zero-mass-positive":  # mergekit: majority = +1 where the mass is >= 0
                    agree = torch.sign(weighted) == torch.where(mass >= 0, 1.0, -1.0)
                else:
                    elected = torch.sign(mass)
                    agree = (torch.sign(weighted) == elected) & (elected != 0)
                merged = (weighted * agree).sum(0)
                if disjoint_mean:
                    # mergekit: divides by the sum of the agreeing weights (edgetune: of their |weights|)
                    div = ((w if explain == "signed-divisor" else w.abs()) * agree).sum(0)
                    merged = merged / torch.where(div == 0, torch.ones_like(div), div)
                return base + scaling * merged
            ties.elect_and_mean = mergekit_elect
        elif explain == "unclamped-cos":  # mergekit: cos clamped to [-1, 1] only
            def ratio(cos: float, n: int) -> float:
                den = 1 + (n - 1) * cos
                return 0.0 if abs(den) < 1e-6 else n * cos / den
            ms.model_stock_ratio = ratio
        yield
    finally:
        ties.count_of, bc.count_of, ties.elect_and_mean, ms.model_stock_ratio = saved


def run_edgetune(cfg_path: Path, out: Path, explain: str | None = None) -> None:
    if not ARGS.in_process and explain is None:
        exe = Path(sys.executable).with_name("edgetune")
        r = subprocess.run([str(exe), "-q", "merge", str(cfg_path), "--out", str(out)], capture_output=True,
                           text=True, check=False)
        if r.returncode:
            raise RuntimeError(f"`edgetune merge` exited {r.returncode}: {r.stderr.strip()[-300:]}")
        return
    from edgetune.merging.job import load_job, run_merge

    if explain in ("base-as-input", "bf16-inputs"):  # the same merge, written another way
        d = yaml.safe_load(cfg_path.read_text())
        if explain == "base-as-input":  # mergekit's linear takes base_model as one more input
            d.pop("base_model")
        else:  # mergekit loads (and merges) the inputs in `dtype`: give edgetune bfloat16 copies
            d["base_model"] = bf16_copy(d["base_model"]) if "base_model" in d else None
            d = {k: v for k, v in d.items() if v is not None}
            d["models"] = [{**m, "model": bf16_copy(m["model"])} for m in d["models"]]
        cfg_path = cfg_path.with_name(f"{cfg_path.stem}-{explain}.yml")
        cfg_path.write_text(yaml.safe_dump(d, sort_keys=False))
    with edgetune_rules(explain):
        run_merge(load_job(cfg_path, output=out))


def bf16_copy(folder: str) -> str:
    """A copy of a model folder with its tensors in bfloat16 (made once)."""
    out = Path(f"{folder}-bf16")
    if not out.exists():
        out.mkdir()
        for f in Path(folder).iterdir():
            if f.suffix == ".safetensors":
                save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(out / f.name),
                          metadata={"format": "pt"})
            elif f.is_file():
                shutil.copy2(f, out / f.name)
    return str(out)


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    if not out:
        raise FileNotFoundError(f"no .safetensors in {folder}")
    return out


# ---------------------------------------------------------------------------------------------------- comparing
@dataclass
class Diff:
    max_abs: float = 0.0
    max_rel: float = 0.0  # max over tensors of max|a - b| / max|b|
    n_diff: int = 0  # entries with |a - b| > 1e-6 max|b| (more than float32 rounding)
    n_bits: int = 0  # entries with a != b at all
    n: int = 0
    max_ulps: float = 0.0  # max|a - b| in units of the last place of the tensor's largest |b| (16-bit outputs)
    worst: str = ""
    keys_only: list[str] = field(default_factory=list)
    dtypes: set[str] = field(default_factory=set)


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Diff:
    d = Diff(keys_only=sorted(set(a) ^ set(b)))
    for k in sorted(set(a) & set(b)):
        x, y = a[k].double(), b[k].double()
        d.dtypes.add(f"{str(a[k].dtype).removeprefix('torch.')}/{str(b[k].dtype).removeprefix('torch.')}")
        if x.shape != y.shape:
            d.keys_only.append(f"{k} (shape {tuple(x.shape)} vs {tuple(y.shape)})")
            continue
        diff = (x - y).abs()
        m = float(diff.max())
        rel = m / max(float(y.abs().max()), 1e-12)
        d.n_diff += int((diff > 1e-6 * float(y.abs().max())).sum())
        d.n_bits += int((diff > 0).sum())
        if b[k].dtype in (torch.bfloat16, torch.float16):
            mant = 7 if b[k].dtype == torch.bfloat16 else 10
            ulp = 2.0 ** (math.floor(math.log2(max(float(y.abs().max()), 1e-30))) - mant)
            d.max_ulps = max(d.max_ulps, m / ulp)
        d.n += diff.numel()
        if m > d.max_abs:
            d.max_abs, d.worst = m, k
        d.max_rel = max(d.max_rel, rel)
    return d


def dare_stats(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor], fts: list[dict[str, torch.Tensor]],
               weights: list[float], lam: float, normalize: bool) -> dict[str, float]:
    """fraction of entries changed from the base; mean |delta| and L2 distance relative to the task-arithmetic
    delta lam * sum_i w_i tau_i (/ sum w with normalize); for one model, the range over tensors of delta / tau on
    the kept entries (the rescale factor)."""
    changed = n = 0
    abs_d = abs_ta = l2_err = l2_ta = 0.0
    scales: list[float] = []
    wsum = sum(weights) if normalize else 1.0
    for k, b in base.items():
        b = b.double()
        delta = merged[k].double() - b
        taus = [f[k].double() - b for f in fts]
        ta = lam * sum(w * t for w, t in zip(weights, taus, strict=True)) / wsum
        changed += int((delta != 0).sum())
        n += delta.numel()
        abs_d += float(delta.abs().sum())
        abs_ta += float(ta.abs().sum())
        l2_err += float(((delta - ta) ** 2).sum())
        l2_ta += float((ta ** 2).sum())
        if len(fts) == 1:
            kept = (delta != 0) & (taus[0] != 0)
            if kept.any():
                r = delta[kept] / (lam * weights[0] / wsum * taus[0][kept])
                scales += [float(r.min()), float(r.max())]
    out = {"frac_changed": changed / n, "mean_abs_rel": abs_d / abs_ta, "l2_rel": (l2_err / l2_ta) ** 0.5}
    if scales:
        out["scale_min"], out["scale_max"] = min(scales), max(scales)
    return out


def moved_bound(base: dict[str, torch.Tensor], case: Case) -> int:
    """An upper bound on the task-vector entries kept by one tool and not the other: per tensor and model, how far
    the edges of the kept band (in magnitude rank) are apart. TIES: edgetune keeps max(1, round(d·n)), mergekit
    max(1, int(d·n)). Breadcrumbs: edgetune drops the top round(g·n) and keeps the next max(1, round(d·n)) (at most
    n − round(g·n)); mergekit keeps int(d·n) below the top n − n_bot − int(d·n), n_bot = max(0, n − int(d·n) −
    int(g·n))."""
    params = [m.get("parameters", {}) for m in case.doc["models"]]
    moved = 0
    for t in base.values():
        n = t.numel()
        for q in params:
            d = float(q.get("density", 1.0))
            if d >= 1:
                continue
            if case.method == "breadcrumbs":
                g = float(q.get("gamma", 0.01))
                e_out = int(g * n + 0.5)
                e_hi = e_out + min(max(1, int(d * n + 0.5)), n - e_out)
                m_hi = n - max(0, n - int(d * n) - int(g * n))
                m_out = m_hi - int(d * n)
                moved += abs(e_out - m_out) + abs(e_hi - m_hi)
            else:
                moved += abs(max(1, int(d * n + 0.5)) - max(1, int(d * n)))
    return moved


# ---------------------------------------------------------------------------------------------------- main
def fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


def main() -> int:
    import transformers

    import edgetune

    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    t0 = time.perf_counter()
    paths = make_models(WORK)
    base_sd = read_folder(Path(paths["base"]))
    ft_sd = {n: read_folder(Path(p)) for n, p in paths.items() if n != "base"}
    rows: list[str] = []
    stats_rows: list[str] = []
    for case in cases(paths):
        cfg_path = WORK / f"{case.id}.yml"
        cfg_path.write_text(yaml.safe_dump(case.doc, sort_keys=False))
        mk_out, et_out = WORK / f"{case.id}-mergekit", WORK / f"{case.id}-edgetune"
        print(f"[{case.id}] {case.method}: {case.options}", flush=True)
        try:
            run_mergekit(cfg_path, mk_out)
        except Exception as e:  # noqa: BLE001 (reported in the table)
            note = f"**mergekit refuses**: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
            try:
                run_edgetune(cfg_path, et_out)
                note += "; **edgetune merges it**"
            except Exception as e2:  # noqa: BLE001
                note += f"; edgetune refuses too: {type(e2).__name__}: {str(e2).splitlines()[0][:150]}"
            if case.note:
                note += f"; {case.note}"
            rows.append(f"| {case.id} | {case.method} | {case.options} | – | – | {note} |")
            continue
        try:
            run_edgetune(cfg_path, et_out)
        except Exception as e:  # noqa: BLE001
            msg = str(e).replace("\n", " ").replace("|", "/")[:220]
            verdict = "edgetune refuses (expected)" if case.kind == "refused" else "**edgetune failed**"
            note = f"{verdict}: {type(e).__name__}: {msg}" + (f"; {case.note}" if case.note else "")
            rows.append(f"| {case.id} | {case.method} | {case.options} | – | – | {note} |")
            continue
        mk, et = read_folder(mk_out), read_folder(et_out)
        d = compare(et, mk)
        extra = []
        if d.keys_only:
            extra.append(f"tensors in one output only: {', '.join(d.keys_only[:4])}")
        if any(a != b for a, b in (s.split("/") for s in d.dtypes)):
            extra.append(f"dtypes edgetune/mergekit: {', '.join(sorted(d.dtypes))}")
        if case.kind == "stats":
            params = [m.get("parameters", {}) for m in case.doc["models"]]
            g = case.doc.get("parameters", {})
            weights = [float(q.get("weight", 1.0)) for q in params]
            fts = [ft_sd[m] for m in case.models]
            s_mk = dare_stats(mk, base_sd, fts, weights, float(g.get("lambda", 1.0)), bool(g.get("normalize", False)))
            s_et = dare_stats(et, base_sd, fts, weights, float(g.get("lambda", 1.0)), bool(g.get("normalize", False)))
            dens = float(params[0].get("density", 1.0))
            expect = 1 - (1 - dens) ** len(fts)
            line = (f"| {case.id} | {case.method} | {case.options} | {expect:.4f} | {s_mk['frac_changed']:.4f} | "
                    f"{s_et['frac_changed']:.4f} | {s_mk['mean_abs_rel']:.3f} | {s_et['mean_abs_rel']:.3f} | "
                    f"{s_mk['l2_rel']:.3f} | {s_et['l2_rel']:.3f} |")
            if "scale_min" in s_mk:
                line += (f" mergekit {s_mk['scale_min']:.3f}–{s_mk['scale_max']:.3f}, edgetune "
                         f"{s_et['scale_min']:.3f}–{s_et['scale_max']:.3f} (1/density = {1 / dens:.3f}) |")
            else:
                line += " – |"
            stats_rows.append(line)
            note = "random (DARE): see the statistics table"
        elif d.max_abs == 0 and not d.keys_only:
            note = "**identical** (bit for bit)"
        elif d.max_rel <= 1e-6 and not d.keys_only:
            note = f"**equal** to float32 rounding ({d.n_bits} of {d.n} entries differ in the last bits)"
        else:
            note = f"**differ**: {d.n_diff} of {d.n} entries by more than float32 rounding, worst in {d.worst}"
            if d.max_ulps:
                note += f" (at most {d.max_ulps:.2g} ulp of the tensor's largest value)"
            if case.explain == "int-counts":
                note += (f"; kept entries that the counts round(·n) vs int(·n) can move: at most "
                         f"{moved_bound(base_sd, case)}")
            if case.explain:
                ex_out = WORK / f"{case.id}-edgetune-{case.explain}"
                run_edgetune(cfg_path, ex_out, explain=case.explain)
                dx = compare(read_folder(ex_out), mk)
                note += (f"; edgetune with mergekit's rule ({case.explain}): max abs diff {fmt(dx.max_abs)}, "
                         f"max rel {fmt(dx.max_rel)}")
                if dx.max_ulps:
                    note += f", {dx.n_diff} entries differ, at most {dx.max_ulps:.2g} ulp"
        note += "".join(f"; {e}" for e in extra)
        if case.note:
            note += f"; {case.note}"
        rows.append(f"| {case.id} | {case.method} | {case.options} | {fmt(d.max_abs)} | {fmt(d.max_rel)} | {note} |")
    seconds = time.perf_counter() - t0
    size = f"{len(base_sd)} tensors, {sum(t.numel() for t in base_sd.values()):,} parameters"
    write_report(rows, stats_rows, seconds, transformers.__version__, getattr(edgetune, "__version__", "?"), size)
    print(f"wrote {ARGS.out} ({seconds:.0f} s)")
    return 0


def _git() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=8", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True,
                               check=True).stdout.strip()
        return sha + (" (src/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _where() -> str:
    import edgetune

    src = Path(edgetune.__file__).resolve().parents[1]
    here = Path(__file__).resolve().parents[1] / "src"
    if SNAPSHOT:
        return f"at git {SNAPSHOT} (committed src/ only, via --edgetune-src HEAD)"
    return f"at git {_git()}" if src == here else f"from {src} (checkout HEAD {_git().split()[0]})"


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def write_report(rows: list[str], stats_rows: list[str], seconds: float, tf_version: str, et_version: str,
                 size: str) -> None:
    mk_version = md.version("mergekit") if _has_dist("mergekit") else "?"
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cmd = "python scripts/compare_mergekit.py " + " ".join(sys.argv[1:])
    text = f"""# edgetune merge vs mergekit on the same mergekit YAML (issue 15)

Command: `{cmd}` ({'`edgetune merge FILE --out DIR` per case' if not ARGS.in_process else
'edgetune in process: `load_job(FILE, output=DIR)` + `run_merge`, what `edgetune merge FILE --out DIR` runs'};
mergekit in process: `mergekit.merge.run_merge` with `MergeOptions(cuda=False, lazy_unpickle=False,
copy_tokenizer=False, random_seed=0)`).
mergekit {mk_version} (installed with `pip install --target` outside the project), edgetune {et_version}
{_where()}, torch {torch.__version__}, transformers {tf_version}, Python {platform.python_version()}; {now};
{_cpu()}, {os.cpu_count()} CPU threads visible, CPU only; {seconds:.0f} s in all.

Models: Hugging Face Llama folders (hidden {HIDDEN}, {LAYERS} layers, intermediate {INTER}, vocab {VOCAB}, untied,
float32; {size}; see `make_models`): a random base and fine-tunes ft_a/b/c = base +
0.01·(0.6·shared + own noise + 1% outliers ×8), ft_neg_a = base − (ft_a − base). Every YAML lists the fine-tunes
by absolute path (and `base_model: base` except for linear).

max |diff| = max over all tensors and entries of |edgetune − mergekit|; max rel diff = max over tensors of
max|edgetune − mergekit| / max|mergekit|. identical = bit for bit; equal = within float32 rounding (rel ≤ 1e-6).
Where the two differ, the edgetune side is run once more with mergekit's rule swapped in (in this process, by
replacing one function of edgetune's, or by rewriting the file; edgetune's files are not changed), to show that
rule is the whole difference: int-counts = keep int(d·n) entries instead of round(d·n); base-as-input = the same
file without `base_model`, so the listed base is averaged as an ordinary model; bf16-inputs = the same file on
bfloat16 copies of the models (mergekit loads and merges the inputs in `dtype`); signed-divisor = TIES divides by
the sum of the agreeing models' weights instead of their |weights|; zero-mass-positive = TIES elects + where the
sign mass is exactly 0; unclamped-cos = Model Stock's mean cosine clamped to [−1, 1] instead of [0, 1].

| case | method | options | max abs diff | max rel diff | equal? / notes |
|---|---|---|---|---|---|
{chr(10).join(rows)}

## DARE (random in both): statistics

frac changed = fraction of entries where merged ≠ base (expected 1 − (1 − density)^N; for dare_ties too, since
the elected sign always has a kept entry behind it). mean|Δ| rel = Σ|merged − base| /
Σ|Δ_TA| and L2 rel = ‖(merged − base) − Δ_TA‖ / ‖Δ_TA‖, with Δ_TA = λ·Σ w_i τ_i (÷ Σw with normalize) the
task-arithmetic delta that DARE equals in expectation. One model: the range over tensors of (merged − base) / τ on
the kept entries, i.e. the rescale factor (mergekit: ‖τ‖₁ / ‖kept τ‖₁ per tensor; edgetune: 1/density exactly).
For dare_ties the yardstick Δ_TA ignores the sign election (and normalize there divides by the agreeing weights,
not Σw), so only the two tools' columns compare with each other. Both draw their own random masks (mergekit
`torch.bernoulli` after `random_seed=0`; edgetune a generator per tensor and model from `seed: 0`), so the entries
kept differ; what must agree is the statistics.

| case | method | options | frac changed expected | mergekit | edgetune | mean\\|Δ\\| rel mergekit | edgetune | L2 rel mergekit | edgetune | rescale of kept entries |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(stats_rows)}

## What the differences are (mergekit {mk_version} source read beside the runs)

- Equal (bit for bit, or to float32 rounding from a different order of operations): linear without a base,
  task_arithmetic (weights, negative weight, normalize, lambda), ties when d·n is whole, dare_linear/dare_ties at
  density 1, breadcrumbs when d·n and g·n are whole, model_stock when the fine-tunes' mean cosine is positive.
- Documented in edgetune's reader: kept counts round(d·n) (edgetune) vs int(d·n) (mergekit `sparsify.magnitude`,
  `magnitude_outliers`): only the few entries at the edge of the kept band differ, within the bound shown; with
  int counts swapped in edgetune is identical. With breadcrumbs' default gamma 0.01 a 64-entry tensor (the norms)
  loses round(0.64) = 1 outlier in edgetune and int(0.64) = 0 in mergekit. TIES where the elected sign's mass is
  exactly 0 (ties-6: opposite task vectors): mergekit's `get_mask` takes `sign_weight >= 0` as +1 and keeps the
  positive entries, edgetune keeps none.
- Not in the reader's list of differences:
  - linear with `base_model` (lin-3, lin-4): mergekit's `plan.py` adds `base_model` to the inputs when it is not
    listed, and linear (base policy IGNORED) averages it like any model (it needs a `weight`); edgetune's reader
    drops a model equal to `base_model` from `models` for every method, and linear does not use the base, so
    lin-3 differs everywhere (edgetune is exactly mergekit once the base is kept as an input) and lin-4, which
    mergekit refuses, edgetune merges without the base.
  - TIES/DARE-TIES `normalize` with a negative weight (ties-4): mergekit divides by `(weights * mask).sum(0)`
    (signed), edgetune's `elect_and_mean` by `(w.abs() * agree).sum(0)`; identical once the divisor is signed.
  - `dtype` (lin-5, ta-4): mergekit loads the inputs in `dtype` and computes in it (task arithmetic's deltas
    in bfloat16; linear accumulates in float32 from the bfloat16 inputs), `out_dtype` is what it writes; edgetune
    reads `out_dtype or dtype` as the output dtype only and computes in float32. The results differ by about one
    bfloat16 ulp of the tensor's largest value; linear on bfloat16 copies of the inputs is identical.
  - model_stock with a negative mean cosine (ms-3): mergekit clamps the cosine to [−1, 1] and extrapolates
    (t < 0), edgetune clamps it to [0, 1] (its own guard, in model_stock.py) and returns the base; identical with
    mergekit's clamp.
  - breadcrumbs with density + gamma > 1 (bc-4): mergekit lowers gamma to 1 − density, edgetune refuses.
- DARE: both keep each entry with probability `density`, so the fraction of entries changed matches
  1 − (1 − d)^N and each other; mergekit rescales each task vector per tensor to keep its L1 norm (a factor
  that varies with the tensor, widely on small ones), edgetune by exactly 1/density; the mean |Δ| and the L2
  distance to the task-arithmetic delta agree to within the sampling noise.
"""
    out = Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def _has_dist(name: str) -> bool:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
