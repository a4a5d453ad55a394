"""Chain of LoRA, COLA (Xia et al. 2024, "Chain of LoRA: Efficient Fine-tuning of Language Models via Residual
Learning").

Training runs in ``links`` phases. Each link trains a fresh LoRA (``A`` re-drawn, ``B`` zero, optimizer state
reset); at its end the link's update ``s * B_l A_l`` is folded in and the next link starts from the folded
weight, so after ``L`` links ``W' = W + s * sum_l B_l A_l``: a residual chain of rank-``r`` steps whose sum can
reach a full-rank update with LoRA's trainable-parameter count.

How a link is folded. The finished link's factors are kept (frozen buffers ``chain_A`` / ``chain_B``, one
slot of ``r`` ranks per link, allocated up front so a checkpoint fits a freshly built model) and their update is
added in the forward on the un-dropped input: exactly ``W + s * B_l A_l`` (the fold into the weight the paper
does), but

- reversibly: the base weight never changes while training, so ``disable_adapters`` is the original base, and
  ``merge_`` / ``unmerge_`` add and subtract the whole chain (``delta_weight``) like any LoRA;
- exportably: the chain is a plain LoRA of rank ``links * r`` (``B_cat = [B_1 .. B_L]``,
  ``A_cat = [A_1; ..; A_L]``, same scale, concatenated on the rank dimension for linear, conv and embedding
  layers), which :meth:`ChainAdapter.as_lora` returns, so the saved adapter rebuilds the trained model from the
  ORIGINAL base (a chain longer than the layer's rank allows is exported at that rank, exactly);
- on any layer: layers without a dense weight (``SparseLinear``) host a chain too.

The price is the frozen path's compute while training (rank ``k * r`` after ``k`` links; nothing is stored
for backward, the buffers need no gradient); ``merge_`` removes it for inference. A fold changes the function
the model computes by nothing (the new link's product is zero), so a merged chain stays consistent.

:class:`ChainCallback` runs the links; a *link policy* (strategy object, :class:`LinkPolicy`) decides how each
link's factors are drawn and which of them train: :class:`ColaLinks` here, the random sketches of RAC-LoRA in
:mod:`edgetune.adapters.rac_lora`. Links after the first draw from a generator seeded by
:func:`link_seed` (the adapter's seed, the link), so the draws are a function of (seed, link) and an exact
resume needs only the link index.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import Field
from torch import Tensor, nn

from edgetune.adapters.config import ADAPTERS, AdapterConfig
from edgetune.adapters.layer import LayerInfo
from edgetune.adapters.lora import (
    LoraAdapter,
    draw_factor,
    factor_shapes,
    lora_delta_weight,
    lora_update,
    max_rank,
)
from edgetune.core.errors import CheckpointError, ConfigError
from edgetune.core.hooks import Callback, TrainState

__all__ = ["ChainAdapter", "ChainCallback", "ChainConfig", "ColaLinks", "LinkPolicy", "chain_callbacks",
           "chain_factors", "compact_factors", "link_seed", "steps_per_link"]

log = logging.getLogger(__name__)


class ChainConfig(AdapterConfig):
    """Chain of LoRA, COLA (Xia et al. 2024).

    links: number of links (LoRA phases); 1 is plain LoRA.
    steps_per_link: optimizer steps per link; None: ``total_steps // links`` (the last link also takes the
        remainder). With more than ``total_steps / links`` fewer links run.
    init_a: how each link's ``A`` is drawn (kaiming: PEFT's Kaiming-uniform; gaussian: N(0, 1/r)).
    """

    method: Literal["chain"] = "chain"
    links: int = Field(default=3, ge=1)
    steps_per_link: int | None = Field(default=None, ge=1)
    init_a: Literal["kaiming", "gaussian"] = "kaiming"

    def link_policy(self) -> LinkPolicy:
        return ColaLinks()


# ------------------------------------------------------------------------------------------ link policies
class LinkPolicy(Protocol):
    """How a chain draws each link's factors, and which of them train.

    ``draw(info, cfg, link, generator) -> (A, B)`` with ``B A = 0`` (a new link starts where the last ended);
    ``frozen(link)``: the factors that must not change during ``link``; ``trainable``: the factors that are
    optimizer parameters for the whole chain (``requires_grad``). A factor trainable but frozen in some link has
    its gradient set to None by :class:`ChainCallback` (optimizers skip parameters without a gradient).
    """

    trainable: tuple[str, ...]

    def draw(self, info: LayerInfo, cfg: AdapterConfig, link: int, generator: torch.Generator
             ) -> tuple[Tensor, Tensor]: ...

    def frozen(self, link: int) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class ColaLinks:
    """COLA: every link is a fresh LoRA (``A`` as LoRA draws it, ``B`` zero; embeddings: ``A`` zero, ``B``
    normal), both factors trained."""

    trainable: tuple[str, ...] = ("A", "B")

    def draw(self, info: LayerInfo, cfg: AdapterConfig, link: int, generator: torch.Generator
             ) -> tuple[Tensor, Tensor]:
        sa, sb = factor_shapes(info, cfg.rank)
        if info.kind == "embedding":
            return draw_factor(sa, "zeros", generator), draw_factor(sb, "normal", generator)
        return draw_factor(sa, getattr(cfg, "init_a", "kaiming"), generator), draw_factor(sb, "zeros", generator)

    def frozen(self, link: int) -> tuple[str, ...]:
        return ()


# ------------------------------------------------------------------------------------------ pure maths
def chain_factors(done_a: Tensor, done_b: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The chain as one LoRA: ``A_cat = [A_1; ..; A_k; A]`` ``(k r + r, ...)`` and ``B_cat = [B_1 .. B_k B]``
    ``(out, k r + r, ...)``, so ``B_cat A_cat = sum_l B_l A_l + B A`` (finished links first)."""
    return torch.cat([done_a, a], dim=0), torch.cat([done_b, b], dim=1)


def compact_factors(a: Tensor, b: Tensor, limit: int) -> tuple[Tensor, Tensor]:
    """``(A', B')`` with at most ``limit`` ranks and the same product as ``(A, B)`` (in LoRA's layouts: ``A``
    ``(k, *fan)``, ``B`` ``(out, k, ...)``), for a chain whose ``k`` ranks exceed what the layer allows
    (``limit = min(out, prod(fan))``). The product goes into one factor and the other becomes an identity:
    ``B' = B A``, ``A' = I`` when ``prod(fan) <= out``, else ``A' = B A``, ``B' = I`` (exact up to one matmul's
    rounding; an identity ``A`` of a convolution extracts each patch element)."""
    if a.shape[0] <= limit:
        return a, b
    am, bm = a.flatten(1), b.flatten(1)  # (k, fan), (out, k)
    fan, out = am.shape[1], bm.shape[0]
    prod = bm @ am  # (out, fan)
    if fan <= out:
        eye = torch.eye(fan, dtype=a.dtype, device=a.device)
        return eye.view(fan, *a.shape[1:]), prod.view(out, fan, *b.shape[2:])
    eye = torch.eye(out, dtype=b.dtype, device=b.device)
    return prod.view(out, *a.shape[1:]), eye.view(out, out, *b.shape[2:])


def link_seed(seed: int, link: int) -> int:
    """Seed of the generator that draws link ``link`` (>= 1) of an adapter seeded ``seed`` (link 0 is drawn by
    the adapter's own initialisation)."""
    return (seed * 1_000_003 + link * 7_919 + 104_729) % 2**63


def steps_per_link(cfg: AdapterConfig, total_steps: int) -> int:
    """Optimizer steps of each link: ``cfg.steps_per_link``, or ``total_steps // cfg.links``."""
    links = int(getattr(cfg, "links", 1))
    spl = getattr(cfg, "steps_per_link", None) or total_steps // links
    if spl < 1:
        raise ConfigError(f"adapter {cfg.name!r}: {links} links do not fit in {total_steps} optimizer steps; lower "
                          f"adapter.links to at most {total_steps}, or train longer")
    return int(spl)


# ------------------------------------------------------------------------------------------ module
class ChainAdapter(LoraAdapter):
    """One chain on one layer: the current link's ``lora_A`` / ``lora_B`` and the finished links in
    ``chain_A`` ``(L' r, ...)`` / ``chain_B`` ``(out, L' r, ...)`` (``L' = links - 1`` slots; ``chain_links``
    of them filled). The config's ``link_policy()`` draws the factors (COLA, RAC-LoRA)."""

    def __init__(self, info: LayerInfo, cfg: AdapterConfig, generator: torch.Generator,
                 reference: Tensor | None = None) -> None:
        super().__init__(info, cfg, generator, reference)
        self.cfg = cfg
        self.policy: LinkPolicy = cfg.link_policy()  # type: ignore[attr-defined]
        self.links = int(getattr(cfg, "links", 1))
        self.seed = int(generator.initial_seed())
        self.frozen = tuple(f for f in ("A", "B") if f not in self.policy.trainable)
        self.lora_A.requires_grad_("A" in self.policy.trainable)
        self.lora_B.requires_grad_("B" in self.policy.trainable)
        slots = (self.links - 1) * self.rank
        self.register_buffer("chain_A", self.lora_A.new_zeros((slots, *self.lora_A.shape[1:])))
        self.register_buffer("chain_B", self.lora_B.new_zeros((self.lora_B.shape[0], slots, *self.lora_B.shape[2:])))
        self.register_buffer("chain_links", torch.zeros((), dtype=torch.long, device=self.lora_A.device))
        self.done = 0  # = chain_links, kept as an int so the forward needs no device sync
        self.register_load_state_dict_post_hook(_sync_done)

    def init_factors(self, info: LayerInfo, cfg: AdapterConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return cfg.link_policy().draw(info, cfg, 0, generator)  # type: ignore[attr-defined]

    def factor(self, which: str) -> nn.Parameter:
        return self.lora_A if which == "A" else self.lora_B

    def finished(self) -> tuple[Tensor, Tensor]:
        """The finished links' factors ``(A, B)``, rank ``done * r``."""
        k = self.done * self.rank
        return self.chain_A[:k], self.chain_B[:, :k]

    def forward(self, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        y = y + self.update(x).to(y.dtype)
        if self.done:  # the folded links see the input as the folded weight would: no dropout
            a, b = self.finished()
            y = y + lora_update(self.info, x, a, b, self.scale, padding_idx=self.padding_idx).to(y.dtype)
        return y

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        a, b = chain_factors(*self.finished(), self.lora_A, self.lora_B)
        return lora_delta_weight(self.info, a, b, self.scale)

    def as_lora(self) -> tuple[Tensor, Tensor, float]:
        """The whole chain as one LoRA: rank ``(done + 1) * r`` (finished links, then the current one), or, when
        that exceeds the layer's ``min(out, fan_in)``, the same update at that rank (:func:`compact_factors`)."""
        a, b = chain_factors(*self.finished(), self.lora_A.detach(), self.lora_B.detach())
        a, b = compact_factors(a, b, max_rank(self.info))
        return a, b, self.scale

    @torch.no_grad()
    def next_link(self, generator: torch.Generator) -> None:
        """Fold the current link into the chain and draw the next one's factors (in place: the optimizer keeps
        its parameters)."""
        if self.done >= self.links - 1:
            raise ConfigError(f"this chain has {self.links} links and all of them have started; it cannot fold "
                              "another one")
        r, k = self.rank, self.done * self.rank
        self.chain_A[k:k + r].copy_(self.lora_A)
        self.chain_B[:, k:k + r].copy_(self.lora_B)
        self.done += 1
        self.chain_links.fill_(self.done)
        a, b = self.policy.draw(self.info, self.cfg, self.done, generator)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)


def _sync_done(module: nn.Module, incompatible: Any) -> None:
    module.done = int(module.chain_links)


# ------------------------------------------------------------------------------------------ callback
class ChainCallback(Callback):
    """Runs the links of a chain's adapters (every layer of one named adapter).

    After the optimizer step that ends a link (global step ``(link + 1) * steps_per_link``, for every link but
    the last) it folds each adapter's link, draws the next link's factors from a generator seeded by
    :func:`link_seed`, and drops the optimizer state of the factors (a fresh Adam for each link; the LR schedule
    runs on over the whole training). In ``after_backward`` it sets to None the gradient of any trainable factor
    its policy freezes in the current link (RAC-LoRA's ``alternate``: the optimizer then leaves it unchanged,
    weight decay included). State for an exact resume: the link index (the draws are a function of seed and link;
    the finished links and current factors are in the model's state).
    """

    def __init__(self, adapters: Sequence[ChainAdapter], *, steps_per_link: int, name: str = "chain") -> None:
        if not adapters:
            raise ConfigError("ChainCallback needs at least one chain adapter")
        links = {a.links for a in adapters}
        seeds = {a.seed for a in adapters}
        if len(links) != 1 or len(seeds) != 1:
            raise ConfigError(f"ChainCallback drives the layers of one adapter; got links {sorted(links)} and seeds "
                              f"{sorted(seeds)}: make one callback per adapter")
        self.adapters = list(adapters)
        self.links, self.seed = links.pop(), seeds.pop()
        self.steps_per_link = int(steps_per_link)
        self.name = name
        self.link = 0

    def on_fit_start(self, state: TrainState) -> None:
        bad = sorted({a.done for a in self.adapters if a.done != self.link})
        if bad:
            raise CheckpointError(f"{self.name}: the callback is at link {self.link} but the model's chain holds "
                                  f"{bad} finished links; load the model state and the callback state of the same "
                                  "checkpoint")

    def after_backward(self, state: TrainState) -> None:
        for ad in self.adapters:
            for which in ad.policy.frozen(self.link):
                ad.factor(which).grad = None

    def after_optimizer_step(self, state: TrainState) -> None:
        done = state.step + 1  # optimizer steps taken; no link starts on the last one (it would never train)
        if self.link < self.links - 1 and (self.link + 1) * self.steps_per_link <= done < state.total_steps:
            self.link += 1
            gen = torch.Generator().manual_seed(link_seed(self.seed, self.link))
            for ad in self.adapters:
                ad.next_link(gen)
                for p in (ad.lora_A, ad.lora_B):
                    state.optimizer.state.pop(p, None)
                    p.grad = None
            log.debug("%s: link %d of %d starts at step %d", self.name, self.link + 1, self.links, state.step + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"link": self.link, "links": self.links, "seed": self.seed, "steps_per_link": self.steps_per_link}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"links": self.links, "seed": self.seed, "steps_per_link": self.steps_per_link}
        theirs = {k: int(state[k]) for k in mine}
        if theirs != mine:
            raise CheckpointError(f"{self.name}: the checkpoint's chain {theirs} differs from this run's {mine}; "
                                  "resume with the adapter settings and seed that wrote it")
        self.link = int(state["link"])

    def metrics(self) -> dict[str, float]:
        return {f"{self.name}_link": float(self.link + 1), f"{self.name}_links_done": float(self.link)}


def chain_callbacks(model: nn.Module, cfg: AdapterConfig, total_steps: int, steps_per_epoch: int
                    ) -> list[Callback]:
    """The :class:`ChainCallback` of adapter ``cfg.name`` (the ``callbacks`` entry of chain methods)."""
    from edgetune.adapters.model import adapter_layers

    adapters = [lay.adapters[cfg.name] for _, lay in adapter_layers(model) if cfg.name in lay.adapters]
    spl = steps_per_link(cfg, total_steps)
    links = int(getattr(cfg, "links", 1))
    if spl * (links - 1) >= total_steps and links > 1:
        log.warning("adapter %r: %d links of %d steps do not fit in %d steps; only %d links will run", cfg.name,
                    links, spl, total_steps, max(1, -(-total_steps // spl)))
    return [ChainCallback(adapters, steps_per_link=spl, name=cfg.method)]


ADAPTERS.add("chain", ChainAdapter, config=ChainConfig, callbacks=chain_callbacks,
             summary="Chain of LoRA, COLA (Xia et al. 2024): fold a LoRA, restart it, repeat for `links` links")
