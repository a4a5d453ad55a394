"""``lora-merge`` benchmark: merging pairs of LoRAs of one base model, in a synthetic but honest setting.

Setting: a frozen random MLP (``d_in -> widths -> classes``, ReLU) is the base. Each generated task ``k`` has its own
inputs -- Gaussian with unit variance on a random subset of ``active`` input features and ``quiet`` elsewhere, so
tasks lean on different features as content and style prompts do -- and its own teacher: the base with a random
rank-2 change of every layer's weight. A LoRA (rank ``rank`` on every Linear) is trained per task to match its
teacher's logits on the task's inputs, through edgetune's adapters. Labels are the teacher's argmax.

LoRA.rar's hypernetwork is trained on pairs of training tasks (ZipLoRA's objective on the layers' inputs captured
under each adapter); the methods are compared on pairs of held-out tasks, never seen by LoRA.rar:

- ``linear`` (average of the updates), ``concat`` (sum), ``svd`` (sum re-compressed to ``rank``): no data;
- ``ziplora``: per-pair optimisation on each adapter's captured inputs; ``ziplora_gaussian``: on Gaussian inputs;
- ``lorarar``: one forward pass of the hypernetwork on the pair's weights; ``lorarar_stats``: the same with the
  adapters' per-feature input energies (``input_stats``).

Quality, per held-out pair and averaged over both adapters ``i``: the relative output error
``||f_merged(x_i) - f_i(x_i)|| / ||f_i(x_i) - f_0(x_i)||`` on adapter ``i``'s test inputs (``f_i`` the base with
adapter ``i``, ``f_0`` the base: the base model scores 1, the adapter itself 0), and the accuracy on task ``i``'s
labels. Time: the median over pairs of the merge itself (ZipLoRA's optimisation; LoRA.rar's features, forward
and factors); capturing the inputs is data preparation, outside both. Rows ``base`` and ``own`` (each adapter
alone on its own task) frame the figures.
"""

from __future__ import annotations

import itertools
import logging
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from edgetune.adapters.lora import LoraConfig
from edgetune.adapters.model import add_adapter_, remove_adapters_, set_active_adapters_
from edgetune.bench.harness import BenchContext, register_suite
from edgetune.merging.lora_merge import Lora, add_lora_, lora_concat, lora_from_model, lora_linear, lora_svd
from edgetune.merging.lorarar import LoraPair, LoraRarConfig, lorarar_merge, train_lorarar
from edgetune.merging.ziplora import Grams, ZipLoraConfig, layer_grams, ziplora
from edgetune.models.mlp import MLP

__all__ = ["LoraTask", "lora_merge_bench", "make_task", "train_task_lora"]

log = logging.getLogger(__name__)


@dataclass
class LoraTask:
    """A generated task with its trained LoRA: inputs, labels, the adapter's factors, the Gram matrices of the
    adapted layers' inputs under it (train inputs), and the adapted model's test outputs."""

    x_train: Tensor
    x_test: Tensor
    y_test: Tensor
    lora: Lora
    grams: Grams
    own_test: Tensor


def _teacher(base: MLP, gen: torch.Generator, strength: float) -> MLP:
    """The base with every Linear's weight changed by a random rank-2 matrix of Frobenius norm ``strength * ||W||``."""
    teacher = MLP(base.layers[0].in_features, base.head.out_features, [lay.out_features for lay in base.layers])
    teacher.load_state_dict(base.state_dict())
    with torch.no_grad():
        for lin in [*teacher.layers, teacher.head]:
            w = lin.weight
            change = torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen)
            w.add_(change * (strength * w.norm() / change.norm()))
    return teacher.eval()


def make_task(base: MLP, gen: torch.Generator, *, active: int, quiet: float, strength: float, n_train: int,
              n_test: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A task: ``(x_train, t_train, x_test, t_test, y_test)`` with ``t`` the teacher's logits, ``y`` its labels."""
    d_in = base.layers[0].in_features
    sigma = torch.full((d_in,), quiet)
    sigma[torch.randperm(d_in, generator=gen)[:active]] = 1.0
    teacher = _teacher(base, gen, strength)
    x_train = torch.randn(n_train, d_in, generator=gen) * sigma
    x_test = torch.randn(n_test, d_in, generator=gen) * sigma
    with torch.no_grad():
        t_train, t_test = teacher(x_train), teacher(x_test)
    return x_train, t_train, x_test, t_test, t_test.argmax(-1)


def train_task_lora(model: MLP, name: str, x: Tensor, target: Tensor, *, rank: int, steps: int, lr: float,
                    seed: int) -> None:
    """Add adapter ``name`` (LoRA of rank ``rank`` on every Linear) to ``model`` and fit ``target`` logits on ``x``
    (full-batch Adam, mean squared error); the adapter stays on the model, the only active one."""
    add_adapter_(model, LoraConfig(rank=rank, alpha=2.0 * rank, targets=["layers.*", "head"]), name=name, seed=seed)
    set_active_adapters_(model, [name])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), target).backward()
        opt.step()
    model.eval()


def _tasks(base: MLP, count: int, gen: torch.Generator, opts: dict[str, Any]) -> list[LoraTask]:
    out = []
    for k in range(count):
        x_tr, t_tr, x_te, _t_te, y_te = make_task(base, gen, active=opts["active"], quiet=opts["quiet"],
                                                  strength=opts["strength"], n_train=opts["n_train"],
                                                  n_test=opts["n_test"])
        name = "task"
        train_task_lora(base, name, x_tr, t_tr, rank=opts["rank"], steps=opts["lora_steps"], lr=opts["lora_lr"],
                        seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
        with torch.no_grad():
            own = base(x_te)
        out.append(LoraTask(x_tr, x_te, y_te, lora_from_model(base, name), layer_grams(base, name, [x_tr]), own))
        remove_adapters_(base, name)
        log.debug("task %d: LoRA trained", k)
    return out


@torch.no_grad()
def _evaluate(base: MLP, merged: Lora | None, tasks: tuple[LoraTask, LoraTask], base_out: tuple[Tensor, Tensor]
              ) -> tuple[float, float]:
    """Mean over the pair's two tasks of the relative output error and of the accuracy (``merged`` None: base)."""
    if merged is not None:
        add_lora_(base, merged, "merged")
    try:
        errs, accs = [], []
        for task, b in zip(tasks, base_out, strict=True):
            out = base(task.x_test)
            errs.append(float((out - task.own_test).norm() / (task.own_test - b).norm()))
            accs.append(float((out.argmax(-1) == task.y_test).float().mean()))
    finally:
        if merged is not None:
            remove_adapters_(base, "merged")
    return sum(errs) / 2, sum(accs) / 2


@torch.no_grad()
def _layer_objective(merged: Lora, tasks: tuple[LoraTask, LoraTask]) -> float:
    """``sum_i tr((D - D_i) G_i (D - D_i)^T) / tr(D_i G_i D_i^T)`` on the captured train inputs, mean over layers."""
    total = 0.0
    for p, lay in merged.items():
        d = lay.delta()
        for t in tasks:
            own, g = t.lora[p].delta(), t.grams[p]
            total += float((((d - own) @ g) * (d - own)).sum() / ((own @ g) * own).sum())
    return total / len(merged)


def lora_merge_bench(*, train_tasks: int = 20, test_tasks: int = 8, train_pairs: int = 120, test_pairs: int = 12,
                     d_in: int = 32, widths: tuple[int, ...] = (64, 64), classes: int = 10, rank: int = 4,
                     active: int = 8, quiet: float = 0.1, strength: float = 0.5, n_train: int = 512,
                     n_test: int = 512, lora_steps: int = 200, lora_lr: float = 1e-2,
                     zip_cfg: ZipLoraConfig | None = None, rar_cfg: LoraRarConfig | None = None, seed: int = 0
                     ) -> list[dict[str, Any]]:
    """Run the benchmark (module docstring); return one row per method: ``rel_error`` and ``accuracy`` (means over
    held-out pairs and both adapters, with ``rel_error_std`` over pairs), ``seconds`` (median merge time per pair),
    ``layer_objective`` (ZipLoRA's objective without the cosine term, on the captured inputs, mean over layers) and
    the setting's sizes."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    zip_cfg = zip_cfg or ZipLoraConfig()
    rar_cfg = rar_cfg or LoraRarConfig(seed=seed)
    base = MLP(d_in, classes, widths).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    opts = {"active": active, "quiet": quiet, "strength": strength, "n_train": n_train, "n_test": n_test,
            "rank": rank, "lora_steps": lora_steps, "lora_lr": lora_lr}
    start = time.perf_counter()
    train = _tasks(base, train_tasks, gen, opts)
    test = _tasks(base, test_tasks, gen, opts)
    log.info("trained %d LoRAs in %.1f s", train_tasks + test_tasks, time.perf_counter() - start)

    rng = random.Random(seed)
    all_train = list(itertools.combinations(range(train_tasks), 2))
    pairs = [LoraPair(train[i].lora, train[j].lora, (train[i].grams, train[j].grams))
             for i, j in rng.sample(all_train, min(train_pairs, len(all_train)))]
    nets, rar_train_s = {}, {}
    for stats in (False, True):
        start = time.perf_counter()
        nets[stats] = train_lorarar(pairs, rar_cfg.replace(input_stats=stats))
        rar_train_s[stats] = time.perf_counter() - start
        log.info("LoRA.rar (input_stats=%s) trained on %d pairs in %.1f s", stats, len(pairs), rar_train_s[stats])

    held = rng.sample(list(itertools.combinations(range(test_tasks), 2)),
                      min(test_pairs, test_tasks * (test_tasks - 1) // 2))
    gauss = zip_cfg.replace(seed=seed)

    def zipped(grams: bool) -> Callable[[tuple[Lora, Lora], tuple[Grams, Grams]], tuple[Lora, float]]:
        def fn(pair: tuple[Lora, Lora], g: tuple[Grams, Grams]) -> tuple[Lora, float]:
            res = ziplora(pair, g if grams else None, zip_cfg if grams else gauss)
            return res.lora, res.seconds
        return fn

    def timed(merge: Callable[[tuple[Lora, Lora], tuple[Grams, Grams]], Lora]) -> Callable[..., tuple[Lora, float]]:
        def fn(pair: tuple[Lora, Lora], g: tuple[Grams, Grams]) -> tuple[Lora, float]:
            t0 = time.perf_counter()
            out = merge(pair, g)
            return out, time.perf_counter() - t0
        return fn

    methods: dict[str, Callable[..., tuple[Lora, float]]] = {
        "linear": timed(lambda pair, g: lora_linear(pair)),
        "concat": timed(lambda pair, g: lora_concat(pair)),
        "svd": timed(lambda pair, g: lora_svd(pair, rank=rank).lora),
        "ziplora": zipped(True),
        "ziplora_gaussian": zipped(False),
        "lorarar": timed(lambda pair, g: lorarar_merge(nets[False], pair)),
        "lorarar_stats": timed(lambda pair, g: lorarar_merge(nets[True], pair, g)),
    }
    for name in ("lorarar", "lorarar_stats", "ziplora"):  # warm-up
        methods[name]((test[0].lora, test[1].lora), (test[0].grams, test[1].grams))
    results: dict[str, dict[str, list[float]]] = {m: {"err": [], "acc": [], "s": [], "obj": []} for m in
                                                  ["base", "own", *methods]}
    with torch.no_grad():
        base_out = {k: base(t.x_test) for k, t in enumerate(test)}
    for i, j in held:
        pair_tasks = (test[i], test[j])
        b_out = (base_out[i], base_out[j])
        err, acc = _evaluate(base, None, pair_tasks, b_out)
        results["base"]["err"].append(err)
        results["base"]["acc"].append(acc)
        own_acc = [float((t.own_test.argmax(-1) == t.y_test).float().mean()) for t in pair_tasks]
        results["own"]["err"].append(0.0)
        results["own"]["acc"].append(sum(own_acc) / 2)
        for name, fn in methods.items():
            merged, seconds = fn((test[i].lora, test[j].lora), (test[i].grams, test[j].grams))
            err, acc = _evaluate(base, merged, pair_tasks, b_out)
            results[name]["err"].append(err)
            results[name]["acc"].append(acc)
            results[name]["s"].append(seconds)
            results[name]["obj"].append(_layer_objective(merged, pair_tasks))
    rows = []
    for name, r in results.items():
        rows.append({
            "method": name, "rel_error": statistics.fmean(r["err"]),
            "rel_error_std": statistics.pstdev(r["err"]), "accuracy": statistics.fmean(r["acc"]),
            "seconds": statistics.median(r["s"]) if r["s"] else None,
            "layer_objective": statistics.fmean(r["obj"]) if r["obj"] else None, "pairs": len(held),
            "train_pairs": len(pairs), "rank": rank, "d_in": d_in, "widths": "x".join(map(str, widths)),
            "lorarar_train_s": rar_train_s[name == "lorarar_stats"] if name.startswith("lorarar") else None,
        })
    zip_s = next(r["seconds"] for r in rows if r["method"] == "ziplora")
    for r in rows:
        if r["seconds"]:
            r["speedup_vs_ziplora"] = zip_s / r["seconds"]
    for r in rows:
        log.info("%-17s rel_error %.3f (+-%.3f)  accuracy %.3f  %s  %s", r["method"], r["rel_error"],
                 r["rel_error_std"], r["accuracy"], f"objective {r['layer_objective']:.3f}" if r["layer_objective"]
                 is not None else "", f"{r['seconds'] * 1e3:.2f} ms" if r["seconds"] else "")
    return rows



# ------------------------------------------------------------------------------------------ the bench suite
QUICK = {"train_tasks": 6, "test_tasks": 4, "train_pairs": 12, "test_pairs": 3, "lora_steps": 60, "n_train": 256,
         "n_test": 256}


def _suite(ctx: BenchContext) -> list[dict[str, Any]]:
    sizes = dict(QUICK) if ctx.quick else {}
    for key in ("train_tasks", "test_tasks", "train_pairs", "test_pairs", "lora_steps"):
        if ctx.option(key) is not None:
            sizes[key] = int(ctx.option(key))
    return lora_merge_bench(seed=ctx.seed, **sizes)


register_suite("merging-lora", "LoRA merging: linear, concat, SVD, ZipLoRA (per-pair optimisation) and LoRA.rar "
               "(a hypernetwork, one forward pass) on held-out adapter pairs: quality and merge time",
               options={k: f"override of {k} (quick: {v})" for k, v in QUICK.items() if k != "n_train"
                        and k != "n_test"})(_suite)
