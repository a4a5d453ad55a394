"""``adapters-speed`` suite: edgetune's LoRA beside PEFT's on one model, LoRA-FA's activation memory, and
inference after merging.

One base model per row group is loaded once and deep-copied for every side, so all sides share its weights,
targets, rank, alpha, batch (random token ids of a fixed seed), optimizer (AdamW, lr 1e-4, no weight decay) and
threads. PEFT's ``lora_A`` is overwritten with edgetune's, so both LoRAs compute the same function and their loss
curves must agree to float round-off (column ``max_abs_loss_diff_vs_peft``): the time compares implementations,
not initialisations. A classification model also trains its new head on both sides (PEFT: set trainable by hand,
not through ``modules_to_save``, which would add a copy of the head).

Three parts (column ``part``):

- ``train``: edgetune LoRA, PEFT LoRA and edgetune LoRA-FA training steps, interleaved round by round (the order
  rotates) so that a change of load on a shared machine hits every side alike. ``step_ms_*``: wall time of
  ``forward + backward + AdamW step`` after ``warmup`` rounds (CUDA synchronized); ``time_vs_peft``: ratio of
  medians; ``time_vs_peft_paired``: median of the per-round ratios (steadier under load). Memory, from one more
  step per side: ``saved_activations_mb``: distinct storages autograd keeps for the backward (counted with
  ``torch.autograd.graph.saved_tensors_hooks``; parameters excluded), exact; ``step_peak_mb``: the highest
  allocation above the step's start (CPU: the allocator events of ``torch.profiler`` with ``profile_memory``;
  CUDA: ``torch.cuda.max_memory_allocated``): activations, gradients and the optimizer's temporaries;
  ``persistent_mb``: parameters, buffers and optimizer state; ``peak_mb``: their sum.
- ``activations``: saved activations and forward+backward peak of LoRA, LoRA-FA and PEFT LoRA at each adapter
  dropout; ``adapter_inputs_mb`` is what LoRA keeps of the adapted layers' inputs (distinct storages) and
  ``projections_mb`` the rank-r projections LoRA-FA keeps instead.
- ``inference``: forward latency (eval, no grad, batch ``infer_batch``) of the base model without adapters,
  edgetune's adapted model unmerged, after ``merge_`` (the :class:`AdapterLayer` wrappers stay and skip merged
  adapters), after ``remove_adapters_(merge=True)`` (the original modules back), and PEFT's ``merge_adapter`` /
  ``merge_and_unload``, interleaved; ``max_abs_diff_vs_unmerged`` checks that merging kept the function. The
  ``merge_`` row also carries a micro-benchmark of one wrapped layer against its bare base layer on one token and
  one thread (``wrapper_overhead_us_per_call``: the Python cost of the wrapper, which a whole forward on a busy
  machine cannot resolve; times the number of wrapped layers in ``wrapper_overhead_us_per_forward``).
"""

from __future__ import annotations

import copy
import csv
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import edgetune.adapters as ad
from edgetune.adapters.lora_fa import LoraFaConfig
from edgetune.bench.harness import BenchContext, register_suite
from edgetune.measure.latency import LatencyResult

__all__ = ["MODELS", "BenchModel", "peak_bytes", "saved_activation_bytes", "speed_table"]

log = logging.getLogger(__name__)
LR = 1e-4


@dataclass(frozen=True)
class BenchModel:
    """A model of the suite: how to build it (``build(seed) -> (model, vocab, head)``), its task and sizes."""

    name: str
    task: str  # classification | lm
    targets: tuple[str, ...]
    batch: int
    seq_len: int
    build: Callable[[int], tuple[nn.Module, int, str | None]]
    quick_batch: int = 2
    quick_seq_len: int = 16


def _tiny_bert(seed: int) -> tuple[nn.Module, int, str | None]:
    import transformers

    from edgetune.models.pretrained.hf import FeatureClassifier

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=128)
    return FeatureClassifier(transformers.BertModel(cfg), nn.Linear(64, 2)), 256, "head"


def _tiny_llama(seed: int) -> tuple[nn.Module, int, str | None]:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg), 256, None


def _pretrained(name: str, task: str) -> Callable[[int], tuple[nn.Module, int, str | None]]:
    def build(seed: int) -> tuple[nn.Module, int, str | None]:
        from edgetune.models.pretrained import load_pretrained

        torch.manual_seed(seed)  # the new head
        loaded = load_pretrained(name, num_classes=2) if task == "classification" else load_pretrained(name, task=task)
        return loaded.model, len(loaded.tokenizer), loaded.head

    return build


MODELS = {m.name: m for m in (
    BenchModel("tiny-bert", "classification", ("query", "value"), 16, 128, _tiny_bert),
    BenchModel("tiny-llama", "lm", ("q_proj", "v_proj"), 4, 128, _tiny_llama),
    BenchModel("minilm", "classification", ("query", "value"), 16, 128, _pretrained("minilm", "classification"),
               quick_seq_len=32),
    BenchModel("smollm2-135m", "lm", ("q_proj", "v_proj"), 4, 128, _pretrained("smollm2-135m", "lm"),
               quick_seq_len=32),
)}


# ------------------------------------------------------------------------------------------ measures
def saved_activation_bytes(fn: Callable[[], Tensor], exclude: Iterable[Tensor] = ()) -> tuple[Tensor, int]:
    """``fn()`` and the bytes of the distinct storages autograd saved for its backward (``exclude``: tensors
    whose storage does not count, e.g. the parameters, which exist anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, str]:
    """The highest allocation above the level at the start of ``fn()`` and how it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start, "torch.cuda.max_memory_allocated"
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch without kineto results: no precise CPU figure
        return None, "unavailable"
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    now = peak = 0
    for _, n in deltas:
        now += n
        peak = max(peak, now)
    return peak, "torch.profiler CPU allocator events"


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer | None) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    if opt is not None:
        tensors += [v for st in opt.state.values() for v in st.values() if isinstance(v, Tensor)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _stats(times: list[float]) -> LatencyResult:
    arr = np.asarray(times, dtype=np.float64)
    p10, med, p90 = (float(v) for v in np.percentile(arr, [10, 50, 90]))
    return LatencyResult(med, p10, p90, float(arr.mean()), len(times), tuple(times))


def _interleaved(fns: dict[str, Callable[[int], Any]], warmup: int, repeats: int, device: torch.device
                 ) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Seconds per call of each ``fns[name](round)`` and what it returned, one call of each per round in an
    order that rotates every round; the first ``warmup`` rounds are not timed."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, list[Any]] = {n: [] for n in names}
    for i in range(warmup + repeats):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            sync()
            t0 = time.perf_counter()
            out = fns[n](i)
            sync()
            if i >= warmup:
                times[n].append(time.perf_counter() - t0)
            results[n].append(out)
    return times, results


def _paired(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ sides
def _batch(spec: BenchModel, vocab: int, batch: int, seq_len: int, seed: int, device: torch.device
           ) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["labels"] = torch.randint(0, 2, (batch,), generator=g) if spec.task == "classification" else ids
    return {k: v.to(device) for k, v in out.items()}


def _loss(model: nn.Module, batch: dict[str, Tensor], task: str) -> Tensor:
    if task == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(logits.float(), batch["labels"])
    return model(**batch).loss


def _logits(model: nn.Module, batch: dict[str, Tensor], task: str) -> Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out if task == "classification" else out.logits


def _edgetune(base: nn.Module, cfg: ad.AdapterConfig, head: str | None, seed: int) -> nn.Module:
    return ad.add_adapter_(copy.deepcopy(base), cfg, seed=seed, head=head)


def _peft(base: nn.Module, like: nn.Module, spec: BenchModel, rank: int, alpha: float, dropout: float,
          head: str | None) -> nn.Module:
    """PEFT's LoRA on a copy of ``base`` with the A factors of edgetune's adapted ``like``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    cfg = PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=list(spec.targets), lora_dropout=dropout, bias="none")
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        pm = get_peft_model(copy.deepcopy(base), cfg)
    inner = pm.base_model.model
    with torch.no_grad():
        for path, layer in ad.adapter_layers(like):
            inner.get_submodule(path).lora_A["default"].weight.copy_(layer.adapters["default"].lora_A)
    if head is not None:
        inner.get_submodule(head).requires_grad_(True)
    return pm


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft_ok() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        log.warning("adapters-speed: peft is not installed; the PEFT columns stay empty (pip install peft)")
        return False
    return True


# ------------------------------------------------------------------------------------------ parts
def _train_rows(spec: BenchModel, base: nn.Module, vocab: int, head: str | None, o: dict[str, Any],
                ctx: BenchContext) -> tuple[list[dict[str, Any]], dict[str, nn.Module]]:
    rank, alpha = o["rank"], o["alpha"]
    lora = ad.LoraConfig(rank=rank, alpha=alpha, targets=list(spec.targets))
    sides = {"edgetune-lora": _edgetune(base, lora, head, ctx.seed)}
    if o["peft"]:
        sides["peft-lora"] = _peft(base, sides["edgetune-lora"], spec, rank, alpha, 0.0, head)
    sides["edgetune-lora_fa"] = _edgetune(base, LoraFaConfig(rank=rank, alpha=alpha, targets=list(spec.targets)),
                                          head, ctx.seed)
    opts = {n: _optimizer(m) for n, m in sides.items()}
    batch = _batch(spec, vocab, o["batch"], o["seq_len"], ctx.seed, ctx.device)

    def stepper(name: str) -> Callable[[int], float]:
        model, opt = sides[name], opts[name]

        def step(i: int) -> float:
            torch.manual_seed(ctx.seed + i)  # the model's own dropout draws the same masks on every side
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, batch, spec.task)
            loss.backward()
            opt.step()
            return float(loss.detach())

        return step

    for m in sides.values():
        m.train()
    times, losses = _interleaved({n: stepper(n) for n in sides}, o["warmup"], o["steps"], ctx.device)
    rows = []
    for name, model in sides.items():
        opt = opts[name]
        opt.zero_grad(set_to_none=True)
        _, saved = saved_activation_bytes(lambda m=model: _loss(m, batch, spec.task).backward(), model.parameters())
        opt.zero_grad(set_to_none=True)
        step = stepper(name)
        step_peak, source = peak_bytes(lambda s=step: s(0), ctx.device)
        persistent = _state_bytes(model, opt)
        lat = _stats(times[name])
        rows.append({"variant": name, "steps_timed": o["steps"], "warmup": o["warmup"], **lat.as_row("step"),
                     "saved_activations_mb": saved / 2**20,
                     "step_peak_mb": step_peak / 2**20 if step_peak is not None else None,
                     "persistent_mb": persistent / 2**20,
                     "peak_mb": (persistent + step_peak) / 2**20 if step_peak is not None else None,
                     "memory_source": source, "trainable_params": _trainable(model),
                     "final_loss": losses[name][-1]})
    if "peft-lora" in sides:
        ref = next(r for r in rows if r["variant"] == "peft-lora")
        for r in rows:
            name = r["variant"]
            r["time_vs_peft"] = r["step_median_ms"] / ref["step_median_ms"]
            r["time_vs_peft_paired"] = _paired(times[name], times["peft-lora"])
            r["peak_vs_peft"] = r["peak_mb"] / ref["peak_mb"] if r["peak_mb"] and ref["peak_mb"] else None
            r["saved_vs_peft"] = r["saved_activations_mb"] / ref["saved_activations_mb"]
            if name != "edgetune-lora_fa":  # same function as PEFT's: the curves must agree to round-off
                r["max_abs_loss_diff_vs_peft"] = max(abs(a - b) for a, b in zip(losses[name], losses["peft-lora"]))
    return rows, sides


def _adapter_inputs(model: nn.Module, batch: dict[str, Tensor], task: str, rank: int) -> tuple[int, int]:
    """Bytes of the distinct inputs of the adapted layers in one forward, and of their rank-r projections."""
    inputs: dict[int, Tensor] = {}  # held until the end, so that no freed storage's address is reused
    proj = 0

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        nonlocal proj
        x = args[0]
        inputs[x.untyped_storage().data_ptr()] = x
        proj += x.numel() // x.shape[-1] * rank * x.element_size()

    handles = [lay.register_forward_pre_hook(hook) for _, lay in ad.adapter_layers(model)]
    try:
        with torch.no_grad():
            _logits(model, batch, task)
    finally:
        for h in handles:
            h.remove()
    return sum(x.numel() * x.element_size() for x in inputs.values()), proj


def _activation_rows(spec: BenchModel, base: nn.Module, vocab: int, head: str | None, o: dict[str, Any],
                     ctx: BenchContext) -> list[dict[str, Any]]:
    rank, alpha, targets = o["rank"], o["alpha"], list(spec.targets)
    batch = _batch(spec, vocab, o["batch"], o["seq_len"], ctx.seed, ctx.device)
    rows = []
    for p in o["dropout"]:
        lora = _edgetune(base, ad.LoraConfig(rank=rank, alpha=alpha, targets=targets, dropout=p), head, ctx.seed)
        sides = {"edgetune-lora": lora,
                 "edgetune-lora_fa": _edgetune(base, LoraFaConfig(rank=rank, alpha=alpha, targets=targets, dropout=p),
                                               head, ctx.seed)}
        if o["peft"]:
            sides["peft-lora"] = _peft(base, lora, spec, rank, alpha, p, head)
        inputs, proj = _adapter_inputs(lora, batch, spec.task, rank)
        group = []
        for name, model in sides.items():
            model.train()
            saved = [0]

            def fwd_bwd(m: nn.Module = model, out: list[int] = saved) -> None:
                torch.manual_seed(ctx.seed)
                loss, out[0] = saved_activation_bytes(lambda: _loss(m, batch, spec.task), m.parameters())
                loss.backward()

            peak, source = peak_bytes(fwd_bwd, ctx.device)
            group.append({"variant": name, "adapter_dropout": p, "saved_activations_mb": saved[0] / 2**20,
                          "fwd_bwd_peak_mb": peak / 2**20 if peak is not None else None, "memory_source": source,
                          "adapter_inputs_mb": inputs / 2**20, "projections_mb": proj / 2**20})
            model.zero_grad(set_to_none=True)
        ref = group[0]
        for r in group:
            r["saved_vs_lora"] = r["saved_activations_mb"] / ref["saved_activations_mb"]
            r["saved_minus_lora_mb"] = r["saved_activations_mb"] - ref["saved_activations_mb"]
            if r["fwd_bwd_peak_mb"] is not None and ref["fwd_bwd_peak_mb"]:
                r["peak_vs_lora"] = r["fwd_bwd_peak_mb"] / ref["fwd_bwd_peak_mb"]
        rows += group
        del sides, lora
    return rows


def _wrapper_overhead_us(layer: ad.AdapterLayer, device: torch.device, calls: int = 200, rounds: int = 40) -> float:
    """Microseconds one call of a (merged) AdapterLayer takes beyond a call of its bare base layer: one token on
    one thread, so that the Python cost is not lost in the noise of a matrix product."""
    x = torch.randn(1, layer.in_features, device=device)

    def many(f: nn.Module) -> Callable[[int], None]:
        def run(_i: int) -> None:
            for _ in range(calls):
                f(x)
        return run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            t, _ = _interleaved({"wrapped": many(layer), "bare": many(layer.base_layer)}, 3, rounds, device)
    finally:
        torch.set_num_threads(threads)
    return (statistics.median(t["wrapped"]) - statistics.median(t["bare"])) / calls * 1e6


def _inference_rows(spec: BenchModel, base: nn.Module, trained: dict[str, nn.Module], vocab: int,
                    o: dict[str, Any], ctx: BenchContext) -> list[dict[str, Any]]:
    batch = _batch(spec, vocab, o["infer_batch"], o["seq_len"], ctx.seed + 1, ctx.device)
    unmerged = trained["edgetune-lora"]
    merged = ad.merge_(copy.deepcopy(unmerged))
    variants = {"base": base, "edgetune-unmerged": unmerged, "edgetune-merge_": merged,
                "edgetune-remove_adapters_merge": ad.remove_adapters_(copy.deepcopy(unmerged), merge=True)}
    if "peft-lora" in trained:
        pm = copy.deepcopy(trained["peft-lora"])
        pm.merge_adapter()
        variants["peft-merge_adapter"] = pm
        variants["peft-merge_and_unload"] = copy.deepcopy(trained["peft-lora"]).merge_and_unload()
    for m in variants.values():
        m.eval()
    with torch.no_grad():
        ref = _logits(unmerged, batch, spec.task)
        diffs = {n: float((_logits(m, batch, spec.task) - ref).abs().max()) for n, m in variants.items()}
        fns = {n: (lambda _i, m=m: _logits(m, batch, spec.task)) for n, m in variants.items()}
        times, _ = _interleaved(fns, o["infer_warmup"], o["infer_repeats"], ctx.device)
    wrapped = ad.adapter_layers(merged)
    path, layer = wrapped[0]
    overhead = _wrapper_overhead_us(layer, ctx.device)
    rows = []
    for name, model in variants.items():
        lat = _stats(times[name])
        row = {"variant": name, "infer_batch": o["infer_batch"], **lat.as_row("latency"),
               "vs_base": lat.median_s / statistics.median(times["base"]),
               "vs_base_paired": _paired(times[name], times["base"]),
               "max_abs_diff_vs_unmerged": diffs[name],
               "wrapped_layers": len(ad.adapter_layers(model)) if name.startswith("edgetune") else None}
        peer = {"edgetune-merge_": "peft-merge_adapter", "edgetune-remove_adapters_merge": "peft-merge_and_unload"}
        if name in peer and peer[name] in times:
            row["time_vs_peft_paired"] = _paired(times[name], times[peer[name]])
        if name == "edgetune-merge_":
            row.update(wrapper_overhead_us_per_call=overhead, wrapper_overhead_us_per_forward=overhead * len(wrapped),
                       wrapper_probe_layer=path)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ suite
def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _f(x: str | None, fmt: str) -> str:
    try:
        return format(float(x), fmt) if x not in (None, "") else "–"
    except ValueError:
        return str(x)


_TABLES = {
    "train": (["step ms (median)", "vs PEFT (paired)", "saved act. MB", "step peak MB", "peak MB", "peak vs PEFT",
               "loss diff vs PEFT", "trainable"],
              ["step_median_ms", "time_vs_peft_paired", "saved_activations_mb", "step_peak_mb", "peak_mb",
               "peak_vs_peft", "max_abs_loss_diff_vs_peft", "trainable_params"],
              [".0f", ".3f", ".1f", ".1f", ".1f", ".4f", ".1e", ".0f"]),
    "activations": (["dropout", "saved act. MB", "vs LoRA", "minus LoRA MB", "fwd+bwd peak MB", "peak vs LoRA",
                     "adapter inputs MB", "projections MB"],
                    ["adapter_dropout", "saved_activations_mb", "saved_vs_lora", "saved_minus_lora_mb",
                     "fwd_bwd_peak_mb", "peak_vs_lora", "adapter_inputs_mb", "projections_mb"],
                    [".1f", ".1f", ".4f", ".1f", ".1f", ".4f", ".1f", ".2f"]),
    "inference": (["latency ms (median)", "vs base (paired)", "vs PEFT (paired)", "max abs diff vs unmerged",
                   "wrapped layers", "wrapper us/forward"],
                  ["latency_median_ms", "vs_base_paired", "time_vs_peft_paired", "max_abs_diff_vs_unmerged",
                   "wrapped_layers", "wrapper_overhead_us_per_forward"],
                  [".2f", ".3f", ".3f", ".1e", ".0f", ".0f"]),
}


def speed_table(csv_path: str | Path) -> str:
    """Markdown of the newest run's rows (the newest full run when there is one), one table per part."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    full = [r for r in rows if r.get("quick") in ("False", "false", "0")]
    rows = full or rows
    newest = max((r.get("timestamp_utc") or "") for r in rows) if rows else ""
    rows = [r for r in rows if (r.get("timestamp_utc") or "") == newest]
    if not rows:
        return "No rows yet.\n"
    r0 = rows[0]
    head = (f"adapters-speed, {r0.get('timestamp_utc', '')[:16]}, git {(r0.get('git_sha') or '')[:8]}, "
            f"{r0.get('device', '')}, {r0.get('torch_threads', '')} threads, torch {r0.get('torch', '')}, "
            f"{r0.get('hardware', '')}, quick={r0.get('quick', '')}\n")
    out = [head]
    for part, (heads, cols, fmts) in _TABLES.items():
        sel = [r for r in rows if r.get("part") == part]
        if not sel:
            continue
        out += [f"\n### {part}\n", "| model | batch x tokens | variant | " + " | ".join(heads) + " |",
                "|---|---|---|" + "---|" * len(heads)]
        for r in sel:
            size = f"{r.get('infer_batch') or r.get('batch')} x {r.get('seq_len')}"
            out.append(f"| {r['model']} | {size} | {r['variant']} | "
                       + " | ".join(_f(r.get(c), fm) for c, fm in zip(cols, fmts)) + " |")
    out.append("\nMeasures: see the docstring of edgetune/adapters/bench/speed.py (saved activations: distinct "
               "storages autograd keeps, parameters excluded; peaks: torch.profiler CPU allocator events or "
               "torch.cuda.max_memory_allocated, above the step's start; paired ratios: median of per-round ratios of "
               "interleaved runs).\n")
    return "\n".join(out)


@register_suite(
    "adapters-speed",
    summary="edgetune LoRA vs PEFT LoRA (step time, peak memory), LoRA-FA activation memory, latency after merge_",
    options={"models": f"models to run, of {', '.join(MODELS)} (default minilm, smollm2-135m; quick tiny-bert, "
                       "tiny-llama)",
             "parts": "train, activations, inference (default all)", "rank": "LoRA rank (default 8)",
             "alpha": "LoRA alpha (default 16)", "steps": "timed training rounds (default 8; quick 3)",
             "warmup": "untimed rounds first (default 2; quick 1)",
             "batch": "training batch (default per model: 16 MiniLM, 4 SmolLM2; quick 2)",
             "seq_len": "tokens per sequence (default 128; quick 16-32)",
             "dropout": "adapter dropouts of the activations part (default [0.0, 0.1])",
             "infer_batch": "inference batch (default 1)", "infer_repeats": "timed inference rounds (default 30)",
             "peft": "compare with PEFT (default: when installed)"},
    table=lambda path: speed_table(path),
)
def _adapters_speed(ctx: BenchContext) -> Iterable[dict[str, Any]]:
    from edgetune.core.errors import ConfigError

    names = [str(n) for n in _as_list(ctx.option("models", ["tiny-bert", "tiny-llama"] if ctx.quick
                                                 else ["minilm", "smollm2-135m"]))]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ConfigError(f"adapters-speed: unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    parts = [str(p) for p in _as_list(ctx.option("parts", ["train", "activations", "inference"]))]
    if bad := [p for p in parts if p not in ("train", "activations", "inference")]:
        raise ConfigError(f"adapters-speed: unknown part(s) {bad}; choose among train, activations, inference")
    for name in names:
        spec = MODELS[name]
        o = {"rank": int(ctx.option("rank", 8)), "alpha": float(ctx.option("alpha", 16.0)),
             "steps": int(ctx.option("steps", 3 if ctx.quick else 8)),
             "warmup": int(ctx.option("warmup", 1 if ctx.quick else 2)),
             "batch": int(ctx.option("batch", spec.quick_batch if ctx.quick else spec.batch)),
             "seq_len": int(ctx.option("seq_len", spec.quick_seq_len if ctx.quick else spec.seq_len)),
             "dropout": [float(p) for p in _as_list(ctx.option("dropout", [0.0, 0.1]))],
             "infer_batch": int(ctx.option("infer_batch", 1)),
             "infer_repeats": int(ctx.option("infer_repeats", 5 if ctx.quick else 30)),
             "infer_warmup": 2 if ctx.quick else 3,
             "peft": bool(ctx.option("peft", True)) and _peft_ok()}
        t0 = time.perf_counter()
        base, vocab, head = spec.build(ctx.seed)
        base = base.to(ctx.device)
        log.info("adapters-speed: %s built in %.1f s", name, time.perf_counter() - t0)
        common = {"model": name, "task": spec.task, "targets": ",".join(spec.targets), "rank": o["rank"],
                  "alpha": o["alpha"], "batch": o["batch"], "seq_len": o["seq_len"], "optimizer": f"AdamW lr {LR}"}
        trained: dict[str, nn.Module] = {}
        if "train" in parts or "inference" in parts:
            rows, trained = _train_rows(spec, base, vocab, head, o, ctx)
            if "train" in parts:
                for r in rows:
                    yield {"part": "train", **common, **r}
        if "activations" in parts:
            for r in _activation_rows(spec, base, vocab, head, o, ctx):
                yield {"part": "activations", **common, **r}
        if "inference" in parts:
            trained.pop("edgetune-lora_fa", None)
            for r in _inference_rows(spec, base, trained, vocab, o, ctx):
                yield {"part": "inference", **common, **r}
        del base, trained
