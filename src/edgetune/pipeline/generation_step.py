"""The ``evaluate-generation`` stage step: what ``evaluate`` measures, plus exact match of greedy answers.

For prompt/answer data (``data.name: instructions``, or any tokenized causal-LM split whose labels are ``-100`` on
the prompt), the model generates greedily after each prompt and its answer is compared with the reference
(:func:`edgetune.train.generation.exact_match`). Figures: ``test_loss``, ``test_ppl``, ``test_acc`` (answer tokens)
as ``evaluate`` gives them, and ``test_exact_match`` (``val_exact_match`` too with ``splits: [val, test]``), so
``expect: {min_test_exact_match: 0.5}`` works. The first few generations go to ``summary.json``
(``<split>_generations``) for a human to read.

It is a step of its own rather than part of ``evaluate`` or ``train``: generation costs many forward passes per
example, so a recipe asks for it where it wants the figure (typically a stage before training and one after,
``model: {from: stage:NAME}``), and the training loop stays free of it.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field

from edgetune.core.config import Config
from edgetune.pipeline.steps import STEPS, StepContext, register_step

__all__ = ["GenerationOptions"]

log = logging.getLogger(__name__)


class GenerationOptions(Config):
    """Options of the ``evaluate-generation`` step (the stage's ``evaluate-generation:`` section).

    splits: which splits to generate for. limit: at most this many examples per split (the first ones).
    batch_size: prompts generated at once. max_new_tokens: generation budget (None: the longest reference answer
    in the batch plus 2 tokens, enough to decide exact match). examples: generations kept in summary.json.
    """

    splits: list[Literal["val", "test"]] = Field(default_factory=lambda: ["test"], min_length=1)
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    examples: int = Field(default=5, ge=0)


@register_step("evaluate-generation", config=GenerationOptions,
               summary="evaluate, plus exact match of greedy answers on prompt/answer data (instructions)")
def evaluate_generation(ctx: StepContext) -> dict[str, Any]:
    from edgetune.data.instructions import end_token_id
    from edgetune.train.generation import exact_match

    opts = ctx.options or GenerationOptions()
    out = STEPS.get("evaluate")(ctx)
    tok = ctx.loaded.tokenizer
    for split in opts.splits:
        data = ctx.data.val if split == "val" else ctx.data.test
        if data is None:
            log.warning("evaluate-generation: the data has no %s split (data.val_fraction=0?); skipped", split)
            continue
        r = exact_match(ctx.loaded.model, data, device=ctx.device, batch_size=opts.batch_size,
                        eos_id=end_token_id(tok), tokenizer=tok, max_new_tokens=opts.max_new_tokens, limit=opts.limit,
                        examples=opts.examples)
        out[f"{split}_exact_match"] = r["exact_match"]
        out[f"{split}_generated"] = r["count"]
        out[f"{split}_mean_new_tokens"] = r["mean_new_tokens"]
        out[f"{split}_generations"] = r["examples"]
    return out
