"""The few-shot class-incremental learner: base classes from a trained backbone, new classes from one or a
few examples each, no backpropagation.

::

    learner = IncrementalLearner(Backbone(model, transform=bundle.transform), calibration="teen",
                                 gate="base-gate-or-vanilla", budget=0.02)
    learner.fit_base(base_train, val=base_val)       # prototypes of the base classes; gate calibrated on val
    learner.add_classes(support)                     # (x, y) of new classes: one prototype each
    learner.predict(x); learner.evaluate(test)       # cosine nearest prototype over every class seen
    learner.evaluate_sessions([s1, s2, ...], test, base=base_train, val=base_val)  # the whole protocol
    learner.save("learner.safetensors"); IncrementalLearner.load("learner.safetensors", backbone)

Prototypes are kept as per-class feature sums and counts, so saving and loading round-trips exactly and
``add_classes(..., update=True)`` folds more examples into a known class exactly. A support label that is
already known is refused unless ``update=True`` (it would silently overwrite a prototype otherwise). Every
check runs before any change: a learner given bad input keeps its classes as they were.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from torch.utils.data import TensorDataset

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError, ShapeError
from edgetune.incremental.features import Backbone
from edgetune.incremental.files import read_tagged, write_tagged
from edgetune.incremental.metrics import session_accuracy
from edgetune.incremental.prototypes import class_sums, cosine_scores, prototypes_from_sums, teen_calibrate

__all__ = ["IncrementalLearner", "LearnerConfig"]

log = logging.getLogger(__name__)

FORMAT = "edgetune-incremental-learner"
VERSION = 1


class LearnerConfig(Config):
    """How prototypes are made and used.

    calibration: ``none`` or ``teen`` (novel prototypes shifted towards similar base ones, TEEN);
    teen_shift / teen_temperature: TEEN's weight of the shift (0.1) and softmax temperature (16);
    normalize_first: average L2-normalized features (True) or raw ones (CEC/TEEN code) before normalizing;
    min_shots: fewest examples a new class may come with;
    gate: novelty gate rule for controllable forgetting (``vanilla`` or None: plain nearest prototype;
        ``base-gate``, ``novel-ball``, ``margin``, ``base-gate-or-vanilla``), calibrated on base validation data
        in :meth:`IncrementalLearner.fit_base` to keep base forgetting within ``budget`` (a fraction, 0.02 = 2%).
    """

    calibration: str = "none"
    teen_shift: float = Field(default=0.1, ge=0.0, le=1.0)
    teen_temperature: float = Field(default=16.0, gt=0.0)
    normalize_first: bool = True
    min_shots: int = Field(default=1, ge=1)
    gate: str | None = None
    budget: float | None = None


def _as_split(data: Any, what: str) -> Any:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ShapeError(f"{what}: {len(x)} inputs but {len(y)} labels")
        return TensorDataset(x, y)
    if hasattr(data, "__len__") and (isinstance(data, TensorDataset) or hasattr(data, "take")):
        return data
    raise ConfigError(f"{what} must be a pair (inputs, labels) of tensors or a dataset split, got "
                      f"{type(data).__name__}")


class IncrementalLearner:
    """Cosine-prototype classifier over a frozen backbone; classes are added session by session.

    backbone: a :class:`Backbone` (or any module, wrapped with defaults) turning inputs into features; None when
    the inputs given to every method are already features ``(N, D)``.
    """

    def __init__(self, backbone: Backbone | torch.nn.Module | None = None, config: LearnerConfig | None = None,
                 **options: Any) -> None:
        cfg = config or LearnerConfig()
        if options:
            cfg = LearnerConfig.model_validate({**cfg.model_dump(), **options})
        if cfg.calibration not in ("none", "teen"):
            raise ConfigError(f"calibration={cfg.calibration!r}: choose none or teen")
        self.config = cfg
        self.backbone = backbone if backbone is None or isinstance(backbone, Backbone) else Backbone(backbone)
        self.gate = _make_gate(cfg)
        self.threshold: float | None = None
        self.classes: list[int] = []
        self.base_classes: list[int] = []
        self.sums = torch.zeros(0, 0, dtype=torch.float64)
        self.counts = torch.zeros(0, dtype=torch.int64)
        self.sessions = 0

    # ------------------------------------------------------------------------------------------------ state
    @property
    def dim(self) -> int | None:
        return int(self.sums.shape[1]) if self.classes else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def novel_classes(self) -> list[int]:
        base = set(self.base_classes)
        return [c for c in self.classes if c not in base]

    def prototypes(self) -> Tensor:
        """``(C, D)`` unit prototypes in :attr:`classes` order (novel ones TEEN-calibrated when configured)."""
        if not self.classes:
            raise ConfigError("the learner has no classes yet: call fit_base(...) first")
        p = prototypes_from_sums(self.sums, self.counts)
        if self.config.calibration == "teen":
            nb = len(self.base_classes)
            if nb < len(self.classes):
                p = p.clone()
                p[nb:] = teen_calibrate(p[nb:], p[:nb], shift=self.config.teen_shift,
                                        temperature=self.config.teen_temperature)
        return p

    # ---------------------------------------------------------------------------------------------- features
    def features(self, data: Any) -> tuple[Tensor, Tensor]:
        """``(z (N, D), y (N,))`` of a split or an ``(x, y)`` pair (through the backbone when there is one)."""
        split = _as_split(data, "data")
        if len(split) == 0:
            raise ConfigError("the data is empty: give at least one example")
        if self.backbone is None:
            x, y = split.tensors if isinstance(split, TensorDataset) else (None, None)
            if x is None or x.ndim != 2:
                raise ShapeError("without a backbone the learner takes features (N, D); got "
                                 f"{'a dict split' if x is None else tuple(x.shape)}: pass IncrementalLearner(backbone)")
            return x.float(), y.long()
        return self.backbone.extract(split)

    def _check_dim(self, z: Tensor) -> None:
        if self.dim is not None and z.shape[1] != self.dim:
            raise ShapeError(f"features have dimension {z.shape[1]} but the learner's prototypes have {self.dim}: "
                             "the backbone (or its pooling) differs from the one used in fit_base")

    # ----------------------------------------------------------------------------------------------- fitting
    def fit_base(self, data: Any, val: Any = None) -> IncrementalLearner:
        """Prototypes of every class in ``data`` (the base session); calibrates the gate on ``val`` (held-out
        base training data, never test data). Replaces anything learned before."""
        z, y = self.features(data)
        return self.fit_base_features(z, y, None if val is None else self.features(val))

    def fit_base_features(self, z: Tensor, y: Tensor, val: tuple[Tensor, Tensor] | None = None) -> IncrementalLearner:
        classes = sorted({int(c) for c in y.tolist()})
        sums, counts = class_sums(z, y, classes, normalize_first=self.config.normalize_first)
        threshold = None
        if self.gate is not None:
            if val is None:
                raise ConfigError(f"gate {self.config.gate!r} calibrates its threshold on held-out base data: call "
                                  "fit_base(train, val=base_validation) (never test data)")
            vz, vy = val
            if vz.ndim != 2 or vz.shape[1] != z.shape[1]:
                raise ShapeError(f"validation features {tuple(vz.shape)} do not match the training features' "
                                 f"dimension {z.shape[1]}")
            wrong = sorted({int(c) for c in vy.tolist()} - set(classes))
            if wrong:
                raise ConfigError(f"the calibration (validation) set holds classes {wrong[:10]} that are not base "
                                  f"classes ({_span(classes)}): calibrate on held-out training data of the base "
                                  "classes only")
            rows = torch.tensor([classes.index(int(c)) for c in vy.tolist()], dtype=torch.int64)
            threshold = float(self.gate.calibrate(F.normalize(vz.float(), dim=1), rows,
                                                  prototypes_from_sums(sums, counts).float(),
                                                  float(self.config.budget or 0.0)))
        self.classes, self.base_classes = classes, list(classes)
        self.sums, self.counts, self.threshold, self.sessions = sums, counts, threshold, 0
        log.debug("base session: %d classes from %d examples%s", len(classes), len(y),
                 f"; gate {self.config.gate} threshold {threshold:.4f}" if threshold is not None else "")
        return self

    def add_classes(self, support: Any, *, update: bool = False) -> list[int]:
        """Add the classes of ``support`` (``(x, y)`` or a split) from their examples; returns the new class
        ids. A label already known is refused, or with ``update=True`` its prototype takes these examples too."""
        z, y = self.features(support)
        return self.add_classes_features(z, y, update=update)

    def add_classes_features(self, z: Tensor, y: Tensor, *, update: bool = False) -> list[int]:
        if not self.classes:
            raise ConfigError("add_classes before fit_base: fit the base classes first (fit_base(train, val))")
        if len(z) == 0:
            raise ConfigError("the support set is empty: give at least one example of each new class")
        self._check_dim(z)
        labels = sorted({int(c) for c in y.tolist()})
        known = [c for c in labels if c in set(self.classes)]
        if known and not update:
            base = [c for c in known if c in set(self.base_classes)]
            raise ConfigError(
                f"support labels {known} are already known ({'base classes ' + str(base) if base else 'added earlier'}"
                "): a new class needs a new label. To refine a known class with these examples, call "
                "add_classes(..., update=True)")
        counts = torch.bincount(torch.tensor([labels.index(int(c)) for c in y.tolist()]), minlength=len(labels))
        short = [f"class {c}: {int(n)}" for c, n in zip(labels, counts) if c not in known and n < self.config.min_shots]
        if short:
            raise ConfigError(f"min_shots={self.config.min_shots} but the support set has too few examples "
                              f"({'; '.join(short)}); give more shots or lower min_shots")
        sums, cnt = class_sums(z, y, labels, normalize_first=self.config.normalize_first)
        new = [c for c in labels if c not in known]
        rows = {c: i for i, c in enumerate(self.classes)}
        all_sums, all_counts = self.sums.clone(), self.counts.clone()
        for i, c in enumerate(labels):
            if c in rows:
                all_sums[rows[c]] += sums[i]
                all_counts[rows[c]] += cnt[i]
        idx = [labels.index(c) for c in new]
        self.sums = torch.cat([all_sums, sums[idx]])
        self.counts = torch.cat([all_counts, cnt[idx]])
        self.classes = self.classes + new
        self.sessions += 1
        log.debug("session %d: %d new classes from %d examples (%d classes in all)", self.sessions, len(new), len(y),
                 len(self.classes))
        return new

    # ------------------------------------------------------------------------------------------- prediction
    def scores_features(self, z: Tensor) -> Tensor:
        """``(N, C)`` cosine scores of features to every prototype (columns in :attr:`classes` order)."""
        self._check_dim(z)
        return cosine_scores(z, self.prototypes()).float()

    def predict_features(self, z: Tensor) -> Tensor:
        """``(N,)`` predicted class ids for features ``(N, D)``."""
        s = self.scores_features(z)
        if self.gate is None:
            col = s.argmax(dim=1)
        else:
            is_base = torch.tensor([c in set(self.base_classes) for c in self.classes])
            col = self.gate.predict(s, is_base, float(self.threshold if self.threshold is not None else 0.0))
        return torch.tensor(self.classes, dtype=torch.int64)[col]

    def predict(self, x: Any) -> Tensor:
        """``(N,)`` predicted class ids for inputs ``x`` (a tensor batch, an ``(x, y)`` pair or a split)."""
        if isinstance(x, Tensor):
            x = (x, torch.zeros(len(x), dtype=torch.int64))
        return self.predict_features(self.features(x)[0])

    def evaluate(self, data: Any) -> dict[str, float | None]:
        """Accuracy over every class seen (``acc``), on base and on novel classes' examples and their harmonic
        mean (``hm``), on a split or ``(x, y)`` holding examples of known classes."""
        z, y = self.features(data)
        return self.evaluate_features(z, y)

    def evaluate_sessions(self, supports: Sequence[Any], test: Any, *, base: Any = None,
                          val: Any = None) -> list[dict[str, Any]]:
        """The few-shot class-incremental protocol on data: fit ``base`` (if given), add each support set in
        turn, test after every session on the ``test`` examples of the classes seen so far; one record per
        session (see :func:`edgetune.incremental.sessions.evaluate_sessions`)."""
        from edgetune.incremental.sessions import evaluate_sessions  # sessions builds on this module

        return evaluate_sessions(self, supports, test, base=base, val=val)

    def evaluate_features(self, z: Tensor, y: Tensor) -> dict[str, float | None]:
        unknown = sorted({int(c) for c in y.tolist()} - set(self.classes))
        if unknown:
            raise ConfigError(f"the test data holds classes {unknown[:10]} the learner has not seen; test on seen "
                              "classes only (the FSCIL protocol tests after session s on classes 0..s)")
        pred = self.predict_features(z)
        return session_accuracy(pred, y, self.base_classes)

    # ------------------------------------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write every prototype (as sums and counts), the classes, the gate's threshold and the config to one
        safetensors file (the backbone is not saved: it is the model of the run or the user's)."""
        tensors = {"sums": self.sums, "counts": self.counts,
                   "classes": torch.tensor(self.classes, dtype=torch.int64),
                   "base_classes": torch.tensor(self.base_classes, dtype=torch.int64)}
        meta = {"config": json.dumps(self.config.model_dump()), "threshold": json.dumps(self.threshold),
                "sessions": str(self.sessions)}
        return write_tagged(path, tensors, meta, FORMAT, VERSION)

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone | torch.nn.Module | None = None) -> IncrementalLearner:
        """A learner from :meth:`save`'s file (with ``backbone`` to take raw inputs)."""
        tensors, meta = read_tagged(path, FORMAT, VERSION, "learner")
        learner = cls(backbone, LearnerConfig.model_validate(json.loads(meta["config"])))
        learner.sums, learner.counts = tensors["sums"], tensors["counts"]
        learner.classes = tensors["classes"].tolist()
        learner.base_classes = tensors["base_classes"].tolist()
        learner.threshold = json.loads(meta["threshold"])
        learner.sessions = int(meta.get("sessions", 0))
        return learner


def _span(classes: Sequence[int]) -> str:
    return f"{classes[0]}-{classes[-1]}" if classes == list(range(classes[0], classes[-1] + 1)) else str(classes[:10])


def _make_gate(cfg: LearnerConfig) -> Any:
    if cfg.gate in (None, "vanilla"):
        if cfg.budget is not None:
            raise ConfigError(f"budget={cfg.budget} needs a novelty gate: set gate=base-gate-or-vanilla (or "
                              "base-gate, novel-ball, margin)")
        return None
    from edgetune.incremental.gates import make_gate

    if cfg.budget is None:
        raise ConfigError(f"gate {cfg.gate!r} needs a forgetting budget, e.g. budget=0.02 for 2%")
    return make_gate(cfg.gate, cfg.budget)
