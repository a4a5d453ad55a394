"""Novelty gates for controllable forgetting: which samples may be given to a novel class (NCD rules A-D).

Paramonov, Ozay, Yang, Moon, Michieli, "Controllable Forgetting Mechanism for Few-Shot Class-Incremental
Learning" (ICASSP 2025, arXiv 2501.15998): a threshold on the similarity to the base prototypes, chosen on base
data alone before any novel class exists, bounds how much base accuracy the novel classes may take away (the
forgetting budget). The exact rule of the paper is not confirmed (research notes §1.1, [X]); the four readings of
the notes are registered strategies in :data:`GATES`, addressed by name:

- ``vanilla``: argmax over all prototypes, no gate (a sample goes to a novel class iff ``s_n > s_b``).
- ``base-gate`` (A): novel iff ``s_b < tau``. Forgetting can only come from flagged base samples, so
  ``FOR <= P(s_b < tau | base)``, which :meth:`NoveltyGate.calibrate` fixes a priori as the ``budget``-quantile
  of ``s_b`` on held-out base data. The only reading with a true a-priori guarantee.
- ``novel-ball`` (B): novel iff ``s_n > tau'``.
- ``margin`` (C): novel iff ``s_n + m > s_b`` (``m = 0`` is vanilla); the threshold is ``m``.
- ``base-gate-or-vanilla`` (D, the default): novel iff ``s_b < tau`` or ``s_n > s_b``; calibrated as A. Never
  below vanilla's novel-class recall; its forgetting is vanilla's plus the gate's.

Notation: features ``z (N, D)`` and prototypes ``P (C, D)`` are unit rows, row index = class id; scores
``S = z @ P.T (N, C)``; ``is_base (C,)`` marks base rows; ``s_b = max_{c base} S[:, c]``,
``s_n = max_{c novel} S[:, c]`` (``-inf`` when there is no novel class). A flagged sample is classified among the
novel prototypes, any other among the base prototypes; with no novel class every sample stays with the base ones.

Each gate thresholds one per-sample ``statistic`` (``s_b`` for A and D, ``s_n`` for B, ``s_b - s_n`` for C), plus
a set of samples it flags whatever the threshold (``always``: D's vanilla part), which lets
:func:`~edgetune.incremental.metrics.operating_curve` sweep any gate exactly.

B and C have no a-priori bound: the notes calibrate them by a *simulated* one-shot session (each group of
``pseudo_shots`` held-out base samples of one class plays a novel prototype, that class is left out of the base
prototypes, and the held-out samples of the other classes it would capture count as forgetting); the threshold is
the one whose mean simulated forgetting meets the budget. This is an approximation (it overshoots in the notes'
measurements) and is documented as such.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor

from edgetune.core.config import Config, validate
from edgetune.core.errors import ConfigError, ShapeError, did_you_mean
from edgetune.core.registry import Registry
from edgetune.incremental.prototypes import check_feature_sets

__all__ = [
    "GATES",
    "BaseGate",
    "BaseGateOrVanilla",
    "MarginGate",
    "NovelBallGate",
    "NoveltyGate",
    "NoveltyGateConfig",
    "VanillaGate",
    "check_budget",
    "make_gate",
    "split_scores",
    "unknown_mask",
]

log = logging.getLogger(__name__)

#: rule name -> gate class (``cls(config)``); each entry carries :class:`NoveltyGateConfig`.
GATES: Registry[type[NoveltyGate]] = Registry("novelty gate")

#: fewer held-out base samples than this and the quantile behind a budget is noisy (notes §1.1: with 90 samples
#: realised forgetting scattered 0.4-6 % around a 2 % budget)
MIN_CALIBRATION = 500
#: samples expected below the budget's quantile for it to be estimated at all
MIN_BELOW_QUANTILE = 10


def check_budget(budget: float) -> float:
    """``budget`` as a float in (0, 1), or :class:`ConfigError` saying what is wrong with it."""
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise ConfigError(f"forgetting budget {budget!r} is not a number: give a fraction in (0, 1), e.g. 0.02 "
                          "for 2%") from None
    if not math.isfinite(b) or not 0.0 < b < 1.0:
        hint = (f" ({b:g} looks like a percentage: use {b / 100:g})" if 1.0 < b < 100.0 else
                " (0 forbids any novel decision: use the vanilla rule with no gate, or a small budget like 0.01)"
                if b == 0.0 else " (1 would allow forgetting every base class)" if b == 1.0 else "")
        raise ConfigError(f"forgetting budget {b:g} is outside (0, 1){hint}: give the fraction of base accuracy "
                          "the novel classes may take, e.g. 0.02 for 2%")
    return b


class NoveltyGateConfig(Config):
    """A novelty gate for controllable forgetting (the learner's ``gate`` / ``budget``).

    rule: a registered gate (``vanilla``, ``base-gate``, ``novel-ball``, ``margin``, ``base-gate-or-vanilla``).
    budget: forgetting budget, a fraction in (0, 1) of base accuracy (0.02 = 2 points).
    count: which held-out base samples count towards the budget when calibrating: ``correct`` (the default: only
        those the base prototypes classify correctly, the ones whose loss is forgetting, so the estimate is of FOR
        itself; on SynGlyph-100 A/D realise 2.0 / 4.6 points at 2% / 5% budgets) or ``all`` (every flagged sample:
        the conservative bound ``FOR <= P(flagged | base)``, which there realises only 1.1 / 3.2).
    pseudo_shots: examples per simulated novel prototype in the B / C calibration (match the sessions' shots).
    max_pseudo: at most this many simulated novel prototypes (seeded subsample) in the B / C calibration.
    seed: seed of the B / C calibration's grouping and subsampling.
    """

    rule: str = "base-gate-or-vanilla"
    budget: float = 0.05
    count: Literal["all", "correct"] = "correct"
    pseudo_shots: int = Field(default=1, ge=1)
    max_pseudo: int = Field(default=512, ge=1)
    seed: int = Field(default=0, ge=0)

    @field_validator("rule")
    @classmethod
    def _rule(cls, v: str) -> str:
        key = v.lower()
        if key not in GATES:
            raise ValueError(f"unknown novelty gate {v!r}.{did_you_mean(key, GATES.names())} Known: "
                             f"{', '.join(GATES.names())}")
        return key

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: float) -> float:
        try:
            return check_budget(v)
        except ConfigError as err:
            raise ValueError(str(err)) from None


def split_scores(scores: Tensor, is_base: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(s_b, base_arg, s_n, novel_arg)``, each ``(N,)``, from cosine scores ``(N, C)`` and ``is_base (C,)``.

    ``s_b`` / ``s_n``: the best base / novel score (``-inf`` where there is no novel column); ``base_arg`` /
    ``novel_arg``: its column (the first one on ties; ``novel_arg`` is meaningless without novel columns).
    """
    _check_scores(scores, is_base)
    neg = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    s_b, base_arg = torch.where(is_base, scores, neg).max(dim=1)
    s_n, novel_arg = torch.where(is_base, neg, scores).max(dim=1)
    return s_b, base_arg, s_n, novel_arg


def unknown_mask(scores: Tensor, is_base: Tensor, base_threshold: float, novel_threshold: float) -> Tensor:
    """``(N,)`` bool, out-of-distribution by-product of the gates: far from every base prototype
    (``s_b < base_threshold``, A/D's tau) and from every novel one (``s_n < novel_threshold``, B's tau')."""
    s_b, _, s_n, _ = split_scores(scores, is_base)
    return (s_b < base_threshold) & (s_n < novel_threshold)


def _check_scores(scores: Tensor, is_base: Tensor) -> None:
    if scores.ndim != 2 or is_base.ndim != 1 or scores.shape[1] != len(is_base):
        raise ShapeError(f"scores must be (N, C) with is_base (C,), got {tuple(scores.shape)} and "
                         f"{tuple(is_base.shape)}")
    if is_base.dtype != torch.bool:
        raise ShapeError(f"is_base must be a bool mask over the prototype rows, got dtype {is_base.dtype}")
    if not bool(is_base.any()):
        raise ConfigError("no prototype is marked as a base class (is_base is all False): the gates compare "
                          "novel prototypes against the base ones")


class NoveltyGate:
    """A rule that decides which samples may go to a novel class. Subclasses set :attr:`name`,
    :attr:`flags_below` and :meth:`statistic_of` (and :meth:`always_of` / :meth:`calibrate` where they differ);
    every rule is a function of the best base and novel scores ``s_b``, ``s_n`` alone.

    A sample is flagged iff ``statistic < threshold`` (``> threshold`` when ``flags_below`` is False) or it is in
    :meth:`always`; flagged samples are classified among the novel prototypes, the rest among the base ones.
    """

    name: ClassVar[str] = ""
    #: flagged iff statistic < threshold (True) or statistic > threshold (False)
    flags_below: ClassVar[bool] = True

    def __init__(self, config: NoveltyGateConfig | None = None) -> None:
        self.config = config if config is not None else NoveltyGateConfig(rule=self.name)

    def statistic_of(self, s_b: Tensor, s_n: Tensor) -> Tensor:
        """``(N,)`` the quantity the threshold acts on, from the best base and novel scores ``(N,)`` each."""
        raise NotImplementedError

    def always_of(self, s_b: Tensor, s_n: Tensor) -> Tensor:
        """``(N,)`` bool: samples flagged novel whatever the threshold (none by default)."""
        return torch.zeros(s_b.shape, dtype=torch.bool, device=s_b.device)

    def statistic(self, scores: Tensor, is_base: Tensor) -> Tensor:
        """``(N,)`` :meth:`statistic_of` the scores ``(N, C)``."""
        s_b, _, s_n, _ = split_scores(scores, is_base)
        return self.statistic_of(s_b, s_n)

    def always(self, scores: Tensor, is_base: Tensor) -> Tensor:
        """``(N,)`` :meth:`always_of` the scores ``(N, C)``."""
        s_b, _, s_n, _ = split_scores(scores, is_base)
        return self.always_of(s_b, s_n)

    def flags_of(self, s_b: Tensor, s_n: Tensor, threshold: float) -> Tensor:
        """``(N,)`` bool: samples sent to the novel prototypes (before checking any exists)."""
        t = self.statistic_of(s_b, s_n)
        hit = t < threshold if self.flags_below else t > threshold
        return hit | self.always_of(s_b, s_n)

    def flags(self, scores: Tensor, is_base: Tensor, threshold: float) -> Tensor:
        """``(N,)`` :meth:`flags_of` the scores ``(N, C)``."""
        s_b, _, s_n, _ = split_scores(scores, is_base)
        return self.flags_of(s_b, s_n, threshold)

    def predict(self, scores: Tensor, is_base: Tensor, threshold: float) -> Tensor:
        """``(N,)`` int64 predicted columns (= class ids) of scores ``(N, C)``; ``is_base (C,)`` bool."""
        s_b, base_arg, s_n, novel_arg = split_scores(scores, is_base)
        flag = self.flags_of(s_b, s_n, threshold) & bool((~is_base).any())
        return torch.where(flag, novel_arg, base_arg)

    def calibrate(self, val_z: Tensor, val_labels: Tensor, base_protos: Tensor, budget: float) -> float:
        """The a-priori threshold for ``budget`` from held-out base data only: ``val_z (N, D)`` unit features,
        ``val_labels (N,)`` base class ids (rows of ``base_protos (Cb, D)``)."""
        scores = _check_calibration(val_z, val_labels, base_protos, budget, self.name)
        s_b, arg = scores.max(dim=1)
        counted = _counted(self.config.count, arg, val_labels)
        return _threshold_for(s_b, counted, budget, flags_below=True, total=len(s_b))


def _check_calibration(val_z: Tensor, val_labels: Tensor, base_protos: Tensor, budget: float, rule: str) -> Tensor:
    """Validate a calibration set, warn when it is too small for ``budget``; return base scores ``(N, Cb)``."""
    budget = check_budget(budget)
    check_feature_sets(base_protos, (val_z, val_labels, "calibration"),
                       empty_hint=f"hold out some base training data (e.g. data.val_fraction) to calibrate gate "
                                  f"{rule!r}'s threshold on")
    wrong = sorted({int(c) for c in val_labels.tolist()} - set(range(len(base_protos))))
    if wrong:
        raise ConfigError(f"a calibration set from the wrong classes: labels {wrong[:10]} are not base classes "
                          f"(0-{len(base_protos) - 1}); the calibration set must be held-out BASE training data, "
                          "never novel-class or test data")
    n = len(val_z)
    need = max(MIN_CALIBRATION, math.ceil(MIN_BELOW_QUANTILE / budget))
    if n < need:
        log.warning("gate %s: the calibration set has %d samples; a forgetting budget of %g%% needs about %d "
                    "held-out base samples (at least %d, and ~%d below the budget's quantile) to be honoured: "
                    "realised forgetting may scatter widely around the budget. Hold out more base training data.",
                    rule, n, 100 * budget, need, MIN_CALIBRATION, MIN_BELOW_QUANTILE)
    return val_z.to(base_protos.dtype) @ base_protos.T


def _counted(count: str, arg: Tensor, labels: Tensor) -> Tensor:
    """``(N,)`` bool: calibration samples whose flagging costs base accuracy."""
    if count == "correct":
        return arg == labels
    return torch.ones_like(labels, dtype=torch.bool)


def _threshold_for(stat: Tensor, counted: Tensor, budget: float, *, flags_below: bool, total: int,
                   weight: Tensor | None = None) -> float:
    """The loosest threshold whose flagged weight stays within ``budget``.

    ``stat (M,)``: the statistic of each calibration item; ``counted (M,)``: items whose flagging counts;
    ``weight (M,)``: each counted item's share (default ``1 / total``). Flagged iff ``stat < t`` (or ``> t``).
    """
    w = torch.full_like(stat, 1.0 / total, dtype=torch.float64) if weight is None else weight.double()
    u = (stat if flags_below else -stat).double()[counted]
    w = w[counted]
    finite = torch.isfinite(u)
    u, w = u[finite], w[finite]
    if len(u) == 0:
        return float("inf") if flags_below else float("-inf")
    order = torch.argsort(u)
    u, cum = u[order], torch.cumsum(w[order], 0)
    k = int(torch.searchsorted(cum, torch.tensor(budget * (1 + 1e-9), dtype=torch.float64), right=True))
    # the k smallest items fit the budget: flag exactly those strictly below u[k] (ties at u[k] stay unflagged)
    t = float(u[k]) if k < len(u) else float(u[-1]) + 1.0
    return t if flags_below else -t


@GATES.register("vanilla", config=NoveltyGateConfig, summary="argmax over all prototypes, no gate")
class VanillaGate(NoveltyGate):
    """Argmax over all prototypes, no gate: novel iff ``s_n > s_b`` (ties stay with the base class)."""

    name = "vanilla"

    def statistic_of(self, s_b: Tensor, s_n: Tensor) -> Tensor:
        return torch.full_like(s_b, float("inf"))

    def always_of(self, s_b: Tensor, s_n: Tensor) -> Tensor:
        return s_n > s_b

    def calibrate(self, val_z: Tensor, val_labels: Tensor, base_protos: Tensor, budget: float) -> float:
        """No threshold (returns 0.0); the inputs are still checked."""
        _check_calibration(val_z, val_labels, base_protos, budget, self.name)
        return 0.0


@GATES.register("base-gate", config=NoveltyGateConfig, summary="rule A: novel iff s_b < tau (a-priori bound)")
class BaseGate(NoveltyGate):
    """Rule A: novel iff the best base score ``s_b < tau``; ``tau`` = budget-quantile of ``s_b`` on base data."""

    name = "base-gate"

    def statistic_of(self, s_b: Tensor, s_n: Tensor) -> Tensor:
        return s_b


@GATES.register("base-gate-or-vanilla", config=NoveltyGateConfig,
                summary="rule D: novel iff s_b < tau or s_n > s_b (default)")
class BaseGateOrVanilla(NoveltyGate):
    """Rule D: novel iff ``s_b < tau`` or ``s_n > s_b`` (A or vanilla); calibrated as A."""

    name = "base-gate-or-vanilla"

    def statistic_of(self, s_b: Tensor, s_n: Tensor) -> Tensor:
        return s_b

    def always_of(self, s_b: Tensor, s_n: Tensor) -> Tensor:
        return s_n > s_b


def _simulated_threshold(gate: NoveltyGate, val_z: Tensor, val_labels: Tensor, base_protos: Tensor, budget: float,
                         pair_statistic: Callable[[Tensor, Tensor], Tensor]) -> float:
    """B / C calibration by a simulated one-shot session on held-out base data.

    ``pair_statistic(sim, s_b_without)`` gives the gate's statistic ``(P, N)`` of sample ``n`` against pseudo
    prototype ``p`` from their cosine ``sim (P, N)`` and each sample's best base score with the pseudo prototype's
    class left out of the base prototypes ``(P, N)``. Returns the threshold whose mean (over pseudo prototypes)
    fraction of captured other-class samples stays within ``budget``.
    """
    scores = _check_calibration(val_z, val_labels, base_protos, budget, gate.name)
    labels = val_labels.long().to(scores.device)
    if len(set(labels.tolist())) < 2:
        raise ConfigError(f"gate {gate.name!r} calibrates by simulating a novel class among the held-out base "
                          "samples and needs held-out examples of at least 2 base classes")
    cfg = gate.config
    z = val_z.to(base_protos.dtype)
    protos, proto_class = _pseudo_prototypes(z, labels, cfg.pseudo_shots, cfg.max_pseudo, cfg.seed)
    sim = protos @ z.T  # (P, N)
    top2, arg2 = scores.topk(min(2, scores.shape[1]), dim=1)  # (N, 2)
    second = top2[:, 1] if top2.shape[1] > 1 else torch.full_like(top2[:, 0], float("-inf"))
    s_b_without = torch.where(arg2[:, 0].unsqueeze(0) == proto_class.unsqueeze(1), second.unsqueeze(0),
                              top2[:, 0].unsqueeze(0))  # (P, N)
    stat = pair_statistic(sim, s_b_without)
    other = labels.unsqueeze(0) != proto_class.unsqueeze(1)  # (P, N): pairs whose capture is forgetting
    counted = other & _counted(cfg.count, arg2[:, 0], labels).unsqueeze(0)
    weight = (1.0 / (len(protos) * other.sum(dim=1).clamp_min(1).double())).unsqueeze(1).expand_as(stat)
    return _threshold_for(stat.reshape(-1), counted.reshape(-1), budget, flags_below=gate.flags_below, total=1,
                          weight=weight.reshape(-1))


def _pseudo_prototypes(z: Tensor, labels: Tensor, shots: int, limit: int, seed: int) -> tuple[Tensor, Tensor]:
    """Unit means of disjoint random groups of ``shots`` same-class rows of ``z (N, D)``: ``(P, D)`` and their
    classes ``(P,)``; at most ``limit`` groups (a seeded subsample)."""
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    groups: list[np.ndarray] = []
    classes: list[int] = []
    for c in sorted(set(labels.tolist())):
        rows = rng.permutation(np.flatnonzero(y == c))
        for i in range(len(rows) // shots):
            groups.append(rows[i * shots:(i + 1) * shots])
            classes.append(c)
    if not groups:
        raise ConfigError(f"pseudo_shots={shots} but no base class has that many held-out samples: lower "
                          "pseudo_shots or hold out more base training data")
    keep = np.sort(rng.choice(len(groups), size=min(limit, len(groups)), replace=False))
    index = torch.as_tensor(np.stack([groups[i] for i in keep]), dtype=torch.int64, device=z.device)  # (P, shots)
    protos = torch.nn.functional.normalize(z[index].mean(dim=1), dim=1)
    return protos, torch.as_tensor([classes[i] for i in keep], dtype=torch.int64, device=z.device)


@GATES.register("novel-ball", config=NoveltyGateConfig, summary="rule B: novel iff s_n > tau' (simulated calibration)")
class NovelBallGate(NoveltyGate):
    """Rule B: novel iff the best novel score ``s_n > tau'`` (a ball around each novel prototype)."""

    name = "novel-ball"
    flags_below = False

    def statistic_of(self, s_b: Tensor, s_n: Tensor) -> Tensor:
        return s_n

    def calibrate(self, val_z: Tensor, val_labels: Tensor, base_protos: Tensor, budget: float) -> float:
        """``tau'`` from a simulated one-shot session on held-out base data (approximate, no a-priori bound)."""
        return _simulated_threshold(self, val_z, val_labels, base_protos, budget, lambda sim, s_b: sim)


@GATES.register("margin", config=NoveltyGateConfig, summary="rule C: novel iff s_n + m > s_b (simulated calibration)")
class MarginGate(NoveltyGate):
    """Rule C: novel iff ``s_n + m > s_b``, i.e. ``s_b - s_n < m`` (``m = 0`` is vanilla)."""

    name = "margin"

    def statistic_of(self, s_b: Tensor, s_n: Tensor) -> Tensor:
        return s_b - s_n

    def calibrate(self, val_z: Tensor, val_labels: Tensor, base_protos: Tensor, budget: float) -> float:
        """``m`` from a simulated one-shot session on held-out base data (approximate, no a-priori bound)."""
        return _simulated_threshold(self, val_z, val_labels, base_protos, budget, lambda sim, s_b: s_b - sim)


def make_gate(rule: str, budget: float, **options: object) -> NoveltyGate:
    """The registered gate ``rule`` with a validated :class:`NoveltyGateConfig` (``budget`` and ``options``)."""
    cfg = validate(NoveltyGateConfig, {"rule": rule, "budget": budget, **options}, where="gate")
    return GATES.get(cfg.rule)(cfg)
