"""The data-aware methods of the ``merging-tasks`` suite (see :mod:`edgetune.merging.bench.tasks`): Fisher, RegMean,
AdaMerging and safety-preserving merging, each fed the data its paper uses.

Each task keeps its own head, so the data-aware methods run on :class:`MultiHead`: the base model with its head
replaced by an identity (``body``, the tensors merged) and every head fixed beside it; ``forward(x, task)`` gives
each example the logits of its own task's head. Its state dict is the backbone's with a ``body.`` prefix, so the
library functions (:mod:`edgetune.merging.fisher`, :mod:`~edgetune.merging.regmean`, ...) see one ordinary model.

Data, all from the training splits (never validation or test):

- ``fisher`` (Matena & Raffel 2022) and ``regmean`` (Jin et al. 2023): each model's statistics (diagonal Fisher with
  labels sampled from the model's own predictions; input Gram matrices of every linear layer) on its own task's
  training inputs, through its own head (the bad model: the base task's inputs and the base head). Statistics are
  computed once per model and reused for every setting and for the merge with the bad model.
- ``adamerging`` (Yang et al. 2024): the merged model's mean prediction entropy on unlabelled training inputs of
  every merged model's task (shuffled together; the paper uses the test inputs, unlabelled; here the training
  split's, so nothing of the test split is seen).
  Measured on this suite (seed 0, full sizes): through each task's head, the base backbone is already as confident
  as that task's fine-tune (mean entropy on the task's training inputs, base vs fine-tune, tasks in order: 0.10 /
  0.09, 0.42 / 0.65, 0.14 / 0.13, 0.09 / 0.04, 0.00 / 0.12, with 10% right on inverted digits at entropy 0.00; with
  ``heads=frozen`` 0.16 / 0.17, 0.32 / 0.64, 0.08 / 0.13, 0.11 / 0.08, 0.21 / 0.16), and the merged model's entropy
  only rises with a uniform lambda (0.15 at 0, 0.25 at 0.3, 0.56 at 1). So AdaMerging keeps little more than the
  base: at the setting chosen on validation its lambdas are 0, 0, 0, 0.93 (digits, the one fine-tune clearly more
  confident than the base), 0, and with the bad model all fall under 0.05 (the library warns). The paper's CLIP
  models have the opposite ordering (fine-tunes far more confident than the zero-shot model). With ``heads=cosine``
  (CLIP-like fixed cosine heads) that ordering holds and entropy falls with lambda to about 0.5 where accuracy peaks
  near 0.3, yet AdaMerging gains little (normalized 0.830 vs the base's 0.823 and task arithmetic's 0.872).
- ``safety`` (Hammoud et al. 2024, :mod:`~edgetune.merging.safety`): as the paper, labelled domain data (the tasks'
  training examples with their labels, cross-entropy) plus the cross-entropy of the merged model on the must-keep
  set: base-task training inputs labelled by the base model's own predictions
  (:func:`~edgetune.merging.safety.must_keep_from_reference`), through the base head.

Hyper-parameters are picked on the tasks' validation splits like the data-free methods' (:data:`GRIDS`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetune.data.batches import TARGET_KEY
from edgetune.merging.adamerging import adamerging
from edgetune.merging.bench.task_setup import Backbone, Task
from edgetune.merging.fisher import fisher_diagonal, fisher_merge, normalize_fisher
from edgetune.merging.regmean import Gram, gram_matrices, regmean_merge
from edgetune.merging.safety import must_keep_from_reference, safety_merge

__all__ = ["DATA_AWARE", "GRIDS", "QUICK_GRIDS", "DataAwareMerges", "DataSizes", "MultiHead"]

log = logging.getLogger(__name__)

SD = dict[str, Tensor]
PREFIX = "body."
PAD = -1e9  # the logit of a class a task's head does not have (exp underflows to exactly 0)
DATA_AWARE = ("fisher", "regmean", "adamerging", "safety")
GRIDS: dict[str, list[dict[str, Any]]] = {
    "fisher": [{"normalize": False}, {"normalize": True}],
    "regmean": [{"alpha": a} for a in (0.3, 0.6, 0.9)],
    "adamerging": [{"granularity": g, "lr": lr} for g in ("task", "layer") for lr in (1e-3, 1e-2)],
    "safety": [{"granularity": g, "lr": lr, "keep_weight": 1.0} for g in ("task", "layer") for lr in (1e-3, 1e-2)],
}
QUICK_GRIDS: dict[str, list[dict[str, Any]]] = {
    "fisher": [{"normalize": False}],
    "regmean": [{"alpha": 0.9}],
    "adamerging": [{"granularity": "layer", "lr": 1e-2}],
    "safety": [{"granularity": "layer", "lr": 1e-2, "keep_weight": 1.0}],
}


@dataclass(frozen=True)
class DataSizes:
    """How much data the data-aware methods see: examples per model (Fisher, RegMean), unlabelled inputs per task
    and must-keep examples (AdaMerging, safety), coefficient-learning steps (Adam, lr 1e-3, the paper's)."""

    fisher: int
    gram: int
    unlabelled: int
    must_keep: int
    steps: int
    batch_per_task: int = 16  # the AdaMerging paper's batch, per task


QUICK_DATA = DataSizes(fisher=128, gram=256, unlabelled=128, must_keep=256, steps=100)
FULL_DATA = DataSizes(fisher=512, gram=1000, unlabelled=400, must_keep=1000, steps=500)


class MultiHead(nn.Module):
    """``body`` (the base model, its head an identity) and fixed task heads: ``forward(x, task)`` -> ``(B, C_max)``.

    x: the model's input ``(B, ...)`` (already prepared); task: ``(B,)`` the head of each example (an index into
    ``heads``). Logits of classes a head lacks are :data:`PAD`. The heads (any modules: Linear, cosine) are frozen
    copies kept outside the module's registry: the state dict is the body's alone, and a Fisher or a Gram never
    sees them.
    """

    def __init__(self, bb: Backbone, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        body = copy.deepcopy(bb.model)
        body.set_submodule(bb.head, nn.Identity())
        self.body = body.eval()
        self._heads = [copy.deepcopy(h).eval().requires_grad_(False) for h in heads]  # a list: not submodules
        self._classes = max(int(h.out_features) for h in heads)

    def forward(self, x: Tensor, task: Tensor) -> Tensor:
        feats = self.body(x)  # (B, D)
        logits = torch.stack([F.pad(h(feats), (0, self._classes - h.out_features), value=PAD)
                              for h in self._heads], 1)  # (B, H, C): every head on every example (no data-dependent
        # shapes, so Fisher's per-example gradients can vmap it); only the own head's row is kept (the others times 0)
        pick = (task.unsqueeze(-1) == torch.arange(len(self._heads), device=task.device)).to(logits.dtype)  # (B, H)
        return (pick.unsqueeze(-1) * logits).sum(1)


def _prefixed(sd: SD) -> SD:
    return {PREFIX + k: v for k, v in sd.items()}


def _unprefixed(stats: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix(PREFIX): v for k, v in stats.items()}


def _batches(x: Tensor, task: int | Tensor, batch: int) -> list[dict[str, Tensor]]:
    t = torch.full((len(x),), task, dtype=torch.long, device=x.device) if isinstance(task, int) else task
    return [{"x": x[i:i + batch], "task": t[i:i + batch]} for i in range(0, len(x), batch)]


class DataAwareMerges:
    """The data-aware merges of the suite's models: model ``i < T`` is task ``i``'s fine-tune (its head ``i``), model
    ``T`` the bad one (the base head ``T``, the base task's inputs).

    bb: the base backbone; tasks, heads: the tasks and their fine-tuned heads; must_keep: the base task (its head is
    the base model's); models: the backbones (head tensors left out) of the T fine-tunes and the bad one.
    """

    def __init__(self, bb: Backbone, tasks: Sequence[Task], heads: Sequence[nn.Module], must_keep: Task,
                 base: SD, models: Sequence[SD], sizes: DataSizes, seed: int) -> None:
        self.module = MultiHead(bb, [*heads, bb.head_of(bb.model)])
        self.base, self.models, self.sizes, self.seed = base, list(models), sizes, seed
        g = torch.Generator().manual_seed(seed)
        self.inputs: list[Tensor] = []  # the training inputs of each model's task, prepared, in a seeded order
        self.labels: list[Tensor] = []  # their labels (the safety merge's domain data is labelled, as in the paper)
        for t in [*tasks, must_keep]:
            x, y = t.train
            perm = torch.randperm(len(x), generator=g)[:max(sizes.fisher, sizes.gram, sizes.unlabelled,
                                                                 sizes.must_keep)]
            self.inputs.append(torch.cat([bb.prep(x[perm[i:i + 1000].to(x.device)])
                                          for i in range(0, len(perm), 1000)]))
            self.labels.append(y[perm.to(y.device)])
        self.heads = [*range(len(tasks)), len(tasks)]  # the head of each model
        self.stats_s: dict[str, float] = {}  # seconds spent on each method's statistics (Fishers, Grams)
        self._fisher: dict[int, SD] = {}
        self._grams: dict[int, dict[str, Gram]] = {}
        keep_inputs = _batches(self.inputs[-1][:sizes.must_keep], len(tasks), 64)
        self.must_keep = must_keep_from_reference(self.module, keep_inputs, state_dict=_prefixed(base))

    def _loaded(self, i: int) -> nn.Module:
        self.module.load_state_dict(_prefixed(self.models[i]))
        return self.module

    def _model_data(self, i: int, n: int, batch: int) -> list[dict[str, Tensor]]:
        return _batches(self.inputs[i][:n], self.heads[i], batch)

    def fisher(self, i: int) -> SD:
        if i not in self._fisher:
            t0 = time.perf_counter()
            self._fisher[i] = _unprefixed(fisher_diagonal(self._loaded(i), self._model_data(i, self.sizes.fisher, 32),
                                                          label="sample", seed=self.seed + i))
            self.stats_s["fisher"] = self.stats_s.get("fisher", 0.0) + time.perf_counter() - t0
        return self._fisher[i]

    def grams(self, i: int) -> dict[str, Gram]:
        if i not in self._grams:
            t0 = time.perf_counter()
            self._grams[i] = _unprefixed(gram_matrices(self._loaded(i), self._model_data(i, self.sizes.gram, 250)))
            self.stats_s["regmean"] = self.stats_s.get("regmean", 0.0) + time.perf_counter() - t0
        return self._grams[i]

    def unlabelled(self, idx: Sequence[int], labelled: bool = False) -> list[dict[str, Tensor]]:
        """Inputs of the tasks of models ``idx``, shuffled together into batches of ``batch_per_task x len(idx)``;
        ``labelled``: with their labels (under :data:`TARGET_KEY`)."""
        n = self.sizes.unlabelled
        x = torch.cat([self.inputs[i][:n] for i in idx])
        task = torch.cat([torch.full((min(n, len(self.inputs[i])),), self.heads[i], dtype=torch.long, device=x.device)
                          for i in idx])
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed)).to(x.device)
        batches = _batches(x[perm], task[perm], self.sizes.batch_per_task * len(idx))
        if labelled:
            y = torch.cat([self.labels[i][:n] for i in idx]).to(x.device)[perm]
            size = self.sizes.batch_per_task * len(idx)
            batches = [{**b, TARGET_KEY: y[j * size:(j + 1) * size]} for j, b in enumerate(batches)]
        return batches

    def merge(self, method: str, opts: dict[str, Any], idx: Sequence[int]) -> SD:
        """Models ``idx`` merged by ``method`` with the setting ``opts`` (a backbone state dict, head left out)."""
        models = [self.models[i] for i in idx]
        if method == "fisher":
            fishers = [self.fisher(i) for i in idx]
            if opts.get("normalize"):
                fishers = [normalize_fisher(f) for f in fishers]
            return fisher_merge(models, fishers)
        if method == "regmean":
            return regmean_merge(models, [self.grams(i) for i in idx], alpha=opts["alpha"])
        cfg = {"method": method, "steps": self.sizes.steps, "seed": self.seed, **opts}
        base, sds = _prefixed(self.base), [_prefixed(m) for m in models]
        if method == "adamerging":
            res = adamerging(self.module, base, sds, self.unlabelled(idx), cfg)
        elif method == "safety":
            res = safety_merge(self.module, base, sds, self.unlabelled(idx, labelled=True), self.must_keep,
                               {**cfg, "domain_loss": "cross_entropy"})
        else:
            raise KeyError(f"{method!r} is not one of the suite's data-aware methods {DATA_AWARE}")
        log.info("%s %s: lambdas (mean over groups) %s", method, opts, [round(v, 3) for v in res.lambdas.mean(0).tolist()])
        return _unprefixed(res.merged)
