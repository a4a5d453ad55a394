"""Few-shot class-incremental classifier heads: a learnable cosine head and a fixed simplex-ETF head.

Both are drop-in replacements for an ``nn.Linear(in_features, num_classes)`` head: they map features
``(..., D)`` to logits ``(..., C)``, carry ``in_features`` / ``num_classes`` (and ``out_features``), and
expose their class vectors as unit rows ``(C, D)`` through :attr:`class_vectors`, from which a learner makes
prototypes.

- :class:`CosineHead`: ``logits = s * cos(x, w_c)`` with learnable ``W``; the base-session head of the FSCIL
  code bases (CEC, TEEN: ``s = 16``).
- :class:`ETFHead`: the class vectors are a simplex ETF frozen at construction (a buffer, never trained;
  Tiomoko Ali et al., ICASSP 2024, arXiv 2402.18614), laid out over ``total_classes`` slots of which the
  first ``num_classes`` are active; the rest are reserved for classes added later (NC-FSCIL, Yang et al.,
  ICLR 2023, pre-allocates the novel classes' vectors the same way). :meth:`ETFHead.activate` hands the next
  reserved slots to new classes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.incremental.etf import simplex_etf

__all__ = ["CosineHead", "ETFHead", "cosine_logits"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_scale(scale: float) -> float:
    if not math.isfinite(float(scale)) or float(scale) <= 0:
        raise ConfigError(f"the logit scale must be a positive number (FSCIL heads use 16), got {scale!r}")
    return float(scale)


def _check_features(head: nn.Module, x: Tensor, in_features: int) -> None:
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ShapeError(
            f"{type(head).__name__} expects features with last dimension in_features={in_features}, got a "
            f"tensor of shape {tuple(x.shape)} (last dimension {x.shape[-1] if x.ndim else 'none'}); build "
            "the head with the backbone's feature size or feed it (..., in_features) features."
        )


def cosine_logits(x: Tensor, w: Tensor, scale: Tensor | float) -> Tensor:
    """``scale * <x/|x|, w_c/|w_c|>``: x ``(..., D)``, w ``(C, D)`` -> ``(..., C)`` (a zero row scores 0)."""
    xn = nn.functional.normalize(x, dim=-1)
    wn = nn.functional.normalize(w, dim=-1)
    return scale * (xn @ wn.T)


class CosineHead(nn.Module):
    """Learnable cosine classifier: ``(..., D)`` features -> ``(..., C)`` logits ``scale * cos(x, w_c)``.

    weight: ``(C, D)`` learnable, initialized like ``nn.Linear``'s (only directions matter).
    scale: the temperature (16 in CEC/TEEN); a fixed buffer, or a learned parameter with ``learn_scale``.
    Both are saved under the same state-dict keys either way.
    """

    def __init__(
        self, in_features: int, num_classes: int, scale: float = 16.0, learn_scale: bool = False
    ) -> None:
        super().__init__()
        self.in_features = _check_positive_int("in_features", in_features)
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        value = torch.tensor(_check_scale(scale))
        if learn_scale:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    @property
    def out_features(self) -> int:
        return self.num_classes

    @property
    def learn_scale(self) -> bool:
        return isinstance(self.scale, nn.Parameter)

    @property
    def class_vectors(self) -> Tensor:
        """``(C, D)`` unit-norm class directions (detached): the head read as prototypes."""
        return nn.functional.normalize(self.weight.detach(), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        _check_features(self, x, self.in_features)
        return cosine_logits(x, self.weight, self.scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"scale={float(self.scale.detach()):g}, learn_scale={self.learn_scale}")


class ETFHead(nn.Module):
    """Fixed simplex-ETF classifier: ``(..., D)`` -> ``(..., num_classes)`` logits ``scale * cos(x, m_c)``.

    The ``(total_classes, D)`` frame :func:`~edgetune.incremental.etf.simplex_etf` ``(total_classes,
    in_features, seed)`` is a buffer (saved with the model, not in ``parameters()``, never trained). Logits
    cover the first ``num_classes`` slots; slots ``num_classes..total_classes-1`` are reserved, and
    :meth:`activate` turns on the next ones for new classes (class ``c`` gets slot ``c``). The number of
    active slots is saved in the state dict (``num_active``) and restored on load.
    When ``in_features < total_classes - 1`` the frame is a near-ETF
    (:func:`~edgetune.incremental.etf.near_etf`, about a second of CPU to build) and a warning says so,
    e.g. ResNet-20's 64-d features with 100 slots (largest pairwise cosine about 0.002 instead of -1/99);
    60 active slots alone fit exactly.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        total_classes: int | None = None,
        scale: float = 16.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.in_features = _check_positive_int("in_features", in_features)
        _check_positive_int("num_classes", num_classes)
        total = num_classes if total_classes is None else _check_positive_int("total_classes", total_classes)
        if total < num_classes:
            raise ConfigError(
                f"total_classes={total} is smaller than num_classes={num_classes}: total_classes counts the "
                "active classes plus the slots reserved for later ones; give total_classes >= num_classes."
            )
        self.total_classes = total
        self.scale = _check_scale(scale)
        self.seed = int(seed)
        frame = simplex_etf(total, in_features, seed=seed, dtype=torch.get_default_dtype())
        self.register_buffer("etf", frame)  # (total_classes, D) unit rows
        self.register_buffer("num_active", torch.tensor(num_classes, dtype=torch.long))
        self._active = num_classes
        self.register_load_state_dict_post_hook(_sync_active)

    @property
    def num_classes(self) -> int:
        """Active classes: the logits' width."""
        return self._active

    @property
    def out_features(self) -> int:
        return self._active

    @property
    def num_reserved(self) -> int:
        """Slots still free for classes added later."""
        return self.total_classes - self._active

    @property
    def weight(self) -> Tensor:
        """``(num_classes, D)`` the active slots' unit vectors (a view of the frozen buffer)."""
        return self.etf[: self._active]

    @property
    def class_vectors(self) -> Tensor:
        """``(num_classes, D)`` unit-norm class directions (detached): the head read as prototypes."""
        return self.etf[: self._active].detach()

    def slot(self, c: int) -> Tensor:
        """``(D,)`` the ETF vector of slot ``c`` (active or reserved), ``0 <= c < total_classes``."""
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.total_classes:
            raise ConfigError(
                f"slot {c!r} does not exist: this ETFHead has slots 0..{self.total_classes - 1}"
            )
        return self.etf[c].detach()

    def activate(self, n: int = 1) -> list[int]:
        """Turn on the next ``n`` reserved slots for new classes; returns their indices (new class ids)."""
        _check_positive_int("n", n)
        if n > self.num_reserved:
            raise ConfigError(
                f"cannot activate {n} more classes: {self._active} of total_classes={self.total_classes} "
                f"slots are in use, {self.num_reserved} reserved slots remain; build the ETFHead with a "
                "larger total_classes (e.g. the number of classes over all sessions)."
            )
        new = list(range(self._active, self._active + n))
        self._active += n
        self.num_active.fill_(self._active)
        return new

    def forward(self, x: Tensor) -> Tensor:
        _check_features(self, x, self.in_features)
        frame = self.etf[: self._active]
        return cosine_logits(x, frame.to(x.dtype) if x.is_floating_point() else frame, self.scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self._active}, "
                f"total_classes={self.total_classes}, scale={self.scale:g}, seed={self.seed}")


def _sync_active(module: ETFHead, incompatible_keys: object) -> None:
    """After ``load_state_dict``: the python count of active slots follows the loaded ``num_active``."""
    active = int(module.num_active)
    if not 1 <= active <= module.total_classes:
        raise ConfigError(
            f"the loaded ETFHead state has num_active={active}, outside 1..total_classes="
            f"{module.total_classes}; load it into an ETFHead built with the same total_classes."
        )
    module._active = active
