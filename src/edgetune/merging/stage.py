"""The ``merge`` stage step: fine-tune several experts from one base, merge them, evaluate, in one recipe.

A stage with ``step: merge`` merges the models its ``merge:`` section names (earlier stages ``stage:NAME``, edgetune
run folders, safetensors files or Hugging Face folders) into the stage's own model, then measures it like
``evaluate``::

    - name: merged
      step: merge
      model: {from: "stage:task-a"}      # the architecture, and what `keep` keeps
      merge: {method: ties, density: 0.2, base: "stage:pretrained", models: ["stage:task-a", "stage:task-b"],
              keep: [head]}

``keep``: state-dict name patterns (globs, ``re:`` regexes, or ``head``) left as the stage's own model has them
instead of merged: task-specific heads of different sizes, for example. Every other tensor of the stage's model
must be in every merged model with the same shape. The result is saved, measured and reported like any stage, with
the merge's own figures (method, models, seconds) in the summary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from pydantic import Field, SerializeAsAny, model_serializer, model_validator
from torch import Tensor

from edgetune.core.config import Config, validate
from edgetune.core.errors import ConfigError
from edgetune.core.select import _matches
from edgetune.merging.base import merge_state_dicts
from edgetune.merging.config import MERGERS, MergeConfig
from edgetune.pipeline.steps import STEPS, StepContext, register_step

__all__ = ["MergeStepConfig"]

log = logging.getLogger(__name__)

_OWN = ("models", "base", "keep", "must_keep_from")


class MergeStepConfig(Config):
    """The ``merge:`` section of a ``step: merge`` stage.

    models: the models to merge, in order (``stage:NAME`` of an earlier stage, a run folder, a ``.safetensors``
        file or a Hugging Face folder). base: the model they were fine-tuned from (the task-vector methods need
        it). keep: name patterns of tensors taken from the stage's own model instead of merged (``head``: its
        classification head). Every other key is the merge method's config (``method: ties``, ``density``...).
    must_keep_from: for ``method: safety``, the model (``stage:NAME`` or a path) whose predictions on the stage's
        validation split are the behaviour the merge must keep (set ``data.val_fraction``).

    The data-aware methods (fisher, regmean, adamerging, safety) measure / learn on the stage's training split.
    """

    models: list[str] = Field(min_length=1)
    base: str | None = None
    keep: list[str] = Field(default_factory=list)
    must_keep_from: str | None = None
    method: SerializeAsAny[MergeConfig]

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and not isinstance(data.get("method"), MergeConfig):
            own = {k: data[k] for k in _OWN if k in data}
            rest = {k: v for k, v in data.items() if k not in _OWN}
            try:
                own["method"] = validate(MergeConfig, rest, "merge")
            except ConfigError as err:
                raise ValueError(str(err).removeprefix("invalid config: ")) from None
            return own
        return data

    @model_serializer(mode="wrap")
    def _flat(self, handler: Any) -> dict[str, Any]:
        """Written back flat, as a recipe gives it (``method: ties`` beside ``models``), so saved configs reload."""
        out = handler(self)
        method = out.pop("method", None)
        return {**out, **(method if isinstance(method, dict) else {})}

    @model_validator(mode="after")
    def _base(self) -> MergeStepConfig:
        if self.base is None and MERGERS.get(self.method.method).needs_base:
            raise ValueError(f"method {self.method.method!r} needs a base model: add `base: stage:NAME` (the stage the "
                             "merged models were fine-tuned from) or a path")
        if (self.method.method == "safety") != (self.must_keep_from is not None):
            raise ValueError("method safety needs `must_keep_from: stage:NAME` (the model whose behaviour the merge "
                             "keeps), and only safety takes it" if self.method.method == "safety" else
                             f"must_keep_from is an option of method safety, not of {self.method.method}; remove it")
        return self



def _state_of(spec: str, ctx: StepContext) -> dict[str, Tensor]:
    if spec.startswith("stage:"):
        name = spec.removeprefix("stage:")
        if name not in ctx.stages:
            raise ConfigError(f"merge: {spec} names no earlier stage; stages before this one: "
                              f"{', '.join(ctx.stages) or '(none)'}")
        return {k: v.detach().cpu() for k, v in ctx.stages[name]().model.state_dict().items()}
    from edgetune.merging.sources import read_state_dict

    return read_state_dict(spec)


def _kept(names: list[str], patterns: list[str], head: str | None) -> set[str]:
    kept: set[str] = set()
    for pat in patterns:
        if pat == "head":
            if head is None:
                raise ConfigError("merge.keep names 'head' but this stage's model has no known head; give tensor name "
                                  "patterns instead")
            hits = {n for n in names if n.startswith(head + ".")}
        else:
            hits = {n for n in names if _matches(n, pat)}
        if not hits:
            raise ConfigError(f"merge.keep pattern {pat!r} matches no tensor of the stage's model; names look like "
                              f"{names[:3]}")
        kept |= hits
    return kept


class _Batches:
    """A split read in order in batches with the stage's per-batch transform applied (as the loop sees it);
    iterable any number of times (AdaMerging and safety pass over the data for every step)."""

    def __init__(self, split: Any, ctx: StepContext, batch_size: int) -> None:
        self.split, self.ctx, self.batch_size = split, ctx, batch_size

    def __iter__(self) -> Iterator[Any]:
        from edgetune.data.batches import take, to_device

        n = len(self.split)
        for i in range(0, n, self.batch_size):
            batch = to_device(take(self.split, torch.arange(i, min(n, i + self.batch_size))), self.ctx.device)
            yield self.ctx.transform(batch) if self.ctx.transform is not None else batch


def _merge_with_data(ctx: StepContext, opts: MergeStepConfig, states: list[dict[str, Tensor]],
                     base: dict[str, Tensor] | None, names: list[str]) -> dict[str, Tensor]:
    """Fisher / RegMean / AdaMerging / safety on the stage's training split, through the stage's own model."""
    from edgetune.merging.data_aware import merge_with_data
    from edgetune.merging.safety import must_keep_from_reference

    model = ctx.loaded.model
    bs = int(getattr(opts.method, "batch_size", 32))
    own = {k: v.detach() for k, v in model.state_dict().items()}
    dev = next(iter(own.values())).device if own else torch.device("cpu")
    # the kept tensors are the stage model's in every input, so no method moves them; all on the model's device
    full = [{**own, **{k: sd[k].to(dev) for k in names}} for sd in states]
    full_base = None if base is None else {**own, **{k: base[k].to(dev) for k in names}}
    must_keep = None
    if opts.must_keep_from is not None:
        if ctx.data.val is None:
            raise ConfigError("merge: method safety labels the stage's validation split with must_keep_from's "
                              "predictions; this stage has none: set data.val_fraction (e.g. 0.1)")
        ref = {**own, **{k: v.to(dev) for k, v in _state_of(opts.must_keep_from, ctx).items() if k in names}}
        must_keep = must_keep_from_reference(model, _Batches(ctx.data.val, ctx, bs), state_dict=ref)
    merged = merge_with_data(opts.method, model, full, full_base, _Batches(ctx.data.train, ctx, bs),
                             must_keep=must_keep)
    return {k: merged[k] for k in names}


@register_step("merge", config=MergeStepConfig,
               summary="merge earlier stages / run folders / files into this stage's model, then evaluate")
def merge_step(ctx: StepContext) -> dict[str, Any]:
    opts: MergeStepConfig = ctx.options
    model = ctx.loaded.model
    own = model.state_dict()
    kept = _kept(list(own), opts.keep, ctx.loaded.head)
    t0 = time.perf_counter()
    states = [_state_of(s, ctx) for s in opts.models]
    base = _state_of(opts.base, ctx) if opts.base else None
    names = [k for k in own if k not in kept]
    for spec, sd in [*zip(opts.models, states, strict=True), *([(opts.base, base)] if base is not None else [])]:
        missing = [k for k in names if k not in sd]
        if missing:
            raise ConfigError(f"merge: {spec} lacks {missing[:3]} of the stage's model; merge models of one "
                              "architecture, or keep those tensors with merge.keep")
        bad = [k for k in names if tuple(sd[k].shape) != tuple(own[k].shape)]
        if bad:
            k = bad[0]
            raise ConfigError(f"merge: {k!r} is {tuple(sd[k].shape)} in {spec} but {tuple(own[k].shape)} in the "
                              f"stage's model ({len(bad)} such tensor(s)); a task-specific head differs in size: "
                              "keep it from the stage's model with merge.keep: [head]")
    if MERGERS.get(opts.method.method).data_aware:
        merged = _merge_with_data(ctx, opts, states, base, names)
    else:
        pick = [{k: sd[k] for k in names} for sd in states]
        merged = merge_state_dicts(pick, opts.method, base=None if base is None else {k: base[k] for k in names})
    with torch.no_grad():
        for k, v in merged.items():
            own[k].copy_(v.to(own[k].dtype))
    seconds = time.perf_counter() - t0
    log.info("merged %d model(s) with %s into the stage's model (%d tensors merged, %d kept) in %.2f s",
             len(states), opts.method.method, len(merged), len(kept), seconds)
    out = STEPS.get("evaluate")(ctx)
    out.update({"merge_method": opts.method.method, "merge_models": list(opts.models), "merge_base": opts.base,
                "merge_tensors": len(merged), "merge_kept": len(kept), "merge_seconds": seconds})
    return out
