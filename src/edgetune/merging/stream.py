"""Merge models tensor by tensor, straight into one safetensors file: :func:`stream_merge`.

Every name, shape and dtype is known from the input headers before any tensor is read, so the output header
is written first and each merged tensor's bytes are appended in order as soon as it is computed. Peak memory is
therefore about one tensor per input (plus the base and the merged tensor), not a whole model: a merge of
models larger than memory runs (mergekit's lazy, out-of-core merging, done as a single stream).

The output is written atomically, like every edgetune file (:mod:`edgetune.core.state`): to a temporary file
beside it, fsynced, then renamed over ``out_path``. On any error, KeyboardInterrupt included, the temporary
file is removed and an existing ``out_path`` is left untouched.

The merge itself is a callable ``merge_tensor(name, tensors, base) -> Tensor`` (or an object with such a
``merge_tensor`` method); its ``needs_base`` attribute, when true, makes ``base`` required.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from edgetune.core.errors import ConfigError, ShapeError
from edgetune.core.state import atomic_writer, remove_temp_files
from edgetune.measure.memory import track_peak_memory
from edgetune.merging.base import Merger, check_options
from edgetune.merging.sources import (
    SAFETENSORS_DTYPES,
    SourceSpec,
    TensorSource,
    check_compatible,
    open_source,
)

__all__ = ["MergeFn", "StreamReport", "read_once_seconds", "stream_merge"]

log = logging.getLogger(__name__)

#: ``merge_tensor(name, tensors, base)``: one merged tensor, shaped like each of ``tensors``
MergeFn = Callable[[str, list[Tensor], "Tensor | None"], Tensor]
_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


@dataclass
class StreamReport:
    """What :func:`stream_merge` did.

    ``bytes_read``: tensor bytes read from the inputs (base included); ``bytes_written``: size of the output
    file (header included). ``peak_rss_delta_bytes``: how far this process's resident memory rose above its
    value at the start of the merge (sampled from ``/proc/self/statm`` every 5 ms by
    :func:`edgetune.measure.track_peak_memory`; ``rss_source`` says ``"ru_maxrss"`` where that file is
    missing). ``read_once_seconds``: time to read every input tensor once, without merging or writing (when
    asked for; measured after the merge, so both see the same warm page cache).
    """

    out_path: Path
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_delta_bytes: int
    rss_source: str
    read_once_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (for logs and benchmark rows)."""
        out = asdict(self)
        out["out_path"] = str(self.out_path)
        return out


# ---------------------------------------------------------------------------------------- helpers
def _merge_fn(merge_tensor: Any) -> tuple[MergeFn, bool, torch.dtype | None]:
    """The callable, its ``needs_base`` flag and its config's output dtype (``cfg.torch_dtype``, as a
    :class:`edgetune.merging.Merger` has), from a function, a bound method or an object with ``merge_tensor``."""
    fn = getattr(merge_tensor, "merge_tensor", merge_tensor)
    if not callable(fn):
        raise ConfigError(f"merge_tensor must be callable as merge_tensor(name, tensors, base) or be an object with "
                          f"such a method; got a {type(merge_tensor).__name__}")
    owner = getattr(fn, "__self__", merge_tensor)
    needs = getattr(merge_tensor, "needs_base", getattr(owner, "needs_base", False))
    dtype = getattr(getattr(owner, "cfg", None), "torch_dtype", None)
    return fn, bool(needs), dtype if isinstance(dtype, torch.dtype) else None


def _out_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        out = dtype
    else:
        out = getattr(torch, str(dtype).removeprefix("torch."), None)
    if dtype is not None and (not isinstance(out, torch.dtype) or not out.is_floating_point or out not in _CODES):
        names = sorted(str(d).removeprefix("torch.") for d in _CODES if d.is_floating_point)
        raise ConfigError(f"dtype={dtype!r} is not a floating-point dtype safetensors can store; use one of "
                          f"{', '.join(names)}, or None to keep each tensor's dtype")
    return out


def _encode_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """safetensors metadata is str -> str: strings are kept, anything else is JSON-encoded. ``format`` defaults
    to ``pt``, which Hugging Face ``from_pretrained`` (transformers 4.x) requires of a safetensors file."""
    out = {"format": "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise ConfigError(f"metadata keys must be strings; got {key!r}")
        try:
            out[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"metadata[{key!r}] cannot be stored: it is not JSON ({err}); give strings, numbers, "
                              "lists and dicts (e.g. the recipe's config.to_dict())") from None
    return out


def _header(plan: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, int]:
    """The safetensors header for tensors laid out in ``plan`` order, and the total size of their data.

    Layout: 8-byte little-endian header length, the JSON header (padded with spaces to 8 bytes), then each
    tensor's bytes, C order, back to back.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in plan:
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offset


def _write_tensor(f: IO[bytes], t: Tensor) -> int:
    """Append ``t``'s bytes (CPU, contiguous, native = little-endian order); return how many."""
    if t.numel() == 0:
        return 0
    data = t.reshape(-1).view(torch.uint8).numpy()  # (numel * itemsize,), no copy
    f.write(data)
    return data.nbytes


def _check_readable(path: Path) -> None:
    """safetensors accepts the header of what was written (offsets contiguous, file fully covered)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt"):
        pass


def _open_all(stack: ExitStack, specs: Sequence[SourceSpec]) -> list[TensorSource]:
    """Open each spec; those opened here are closed when ``stack`` closes (sources passed in stay open)."""
    out = []
    for spec in specs:
        src = open_source(spec)
        if src is not spec:
            stack.callback(src.close)
        out.append(src)
    return out


# ---------------------------------------------------------------------------------------- public
def read_once_seconds(sources: Sequence[SourceSpec]) -> float:
    """Seconds to read every tensor of every source once (the floor a streamed merge cannot beat)."""
    with ExitStack() as stack:
        srcs = _open_all(stack, sources)
        t0 = time.perf_counter()
        for src in srcs:
            for key in src:
                src.get(key)  # read and dropped at once
        return time.perf_counter() - t0


def stream_merge(
    sources: Sequence[SourceSpec],
    merge_tensor: MergeFn | Any,
    out_path: str | os.PathLike[str],
    *,
    base: SourceSpec | None = None,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    compare_read: bool = False,
) -> StreamReport:
    """Merge ``sources`` tensor by tensor into the safetensors file ``out_path``; return a :class:`StreamReport`.

    For each tensor name (in the first source's storage order) the tensor is read from every source (and from
    ``base``), ``merge_tensor(name, tensors, base_tensor)`` computes the merged tensor, and its bytes are
    appended to the output, whose header was written first. Sources are anything :func:`open_source` takes;
    they must hold the same names and shapes (checked from the headers by :func:`check_compatible` before any
    tensor is read).

    ``merge_tensor``: a callable, or an object with a ``merge_tensor`` method; a true ``needs_base`` attribute
    on it makes ``base`` required. Its result must have the inputs' shape.
    ``out_path``: a file, or an existing folder (then ``out_path/model.safetensors``); written atomically.
    ``metadata``: stored in the file's safetensors metadata; values that are not strings are JSON-encoded
    (put the merge recipe here). ``format`` defaults to ``pt``.
    ``dtype``: store floating-point tensors in this dtype (e.g. ``torch.bfloat16``); integer and bool tensors
    (buffers such as step counters) keep theirs. None: the merger's ``cfg.torch_dtype`` when it has one (a
    :class:`~edgetune.merging.Merger` built from a config with ``dtype``), else each tensor's dtype in the first
    source. The output header is written before any tensor is merged, so a result of another dtype is cast.
    ``progress``: called as ``progress(done, total, name)`` after each tensor.
    ``compare_read``: also time a plain read of the inputs (:attr:`StreamReport.read_once_seconds`).
    """
    if sys.byteorder != "little":  # pragma: no cover - no big-endian torch build in use
        raise ConfigError("stream_merge writes safetensors (little-endian) from native tensors; this machine is "
                          "big-endian")
    fn, needs_base, merger_dtype = _merge_fn(merge_tensor)
    if needs_base and base is None:
        raise ConfigError(f"{getattr(merge_tensor, '__name__', type(merge_tensor).__name__)} needs a base model (the "
                          "model the fine-tunes started from): pass base=...")
    if not sources:
        raise ConfigError("nothing to merge: give at least one model")
    owner = getattr(getattr(merge_tensor, "merge_tensor", None), "__self__", merge_tensor)
    if isinstance(owner, Merger):  # weights, density, base: checked before anything is read or written
        if owner.data_aware:
            raise ConfigError(f"method {owner.cfg.method!r} needs the model and data, not only weights: use "
                              "edgetune.merging.merge_with_data(...) or a merge stage of a recipe (step: merge), "
                              "whose data and model it uses")
        if owner.whole_model:
            raise ConfigError(f"method {owner.cfg.method!r} needs whole models at once and cannot stream tensor by "
                              "tensor; merge in memory with merge_state_dicts (edgetune merge and the merge stage "
                              "do so for it)")
        check_options(owner, len(sources), base is not None)
    want = _out_dtype(dtype) if dtype is not None else merger_dtype
    meta = _encode_metadata(metadata)
    out = Path(out_path)
    if out.is_dir():
        out = out / "model.safetensors"
    remove_temp_files(out.parent, re.escape(out.name))  # what a killed earlier merge into this file left
    with ExitStack() as stack:
        srcs = _open_all(stack, sources)
        base_src = _open_all(stack, [base])[0] if base is not None else None
        check_compatible(srcs, base_src)
        ref = srcs[0]
        keys = ref.keys()
        plan = []
        for key in keys:
            kept = ref.dtype(key)
            plan.append((key, want if want is not None and kept.is_floating_point else kept, ref.shape(key)))
        head, data_bytes = _header(plan, meta)
        log.info("merging %d tensors of %d model(s)%s into %s (%.1f MiB)", len(keys), len(srcs),
                 " with a base" if base_src is not None else "", out, data_bytes / 2**20)
        bytes_read = 0
        t0 = time.perf_counter()
        with track_peak_memory(interval_s=0.005) as mem, atomic_writer(out, check=_check_readable) as f:
            f.write(head)
            written = len(head)
            for i, (key, out_dtype, shape) in enumerate(plan):
                tensors = [s.get(key) for s in srcs]
                base_t = base_src.get(key) if base_src is not None else None
                bytes_read += sum(t.numel() * t.element_size() for t in tensors)
                bytes_read += base_t.numel() * base_t.element_size() if base_t is not None else 0
                merged = fn(key, tensors, base_t)
                del tensors, base_t
                if not isinstance(merged, Tensor) or tuple(merged.shape) != shape:
                    got = tuple(merged.shape) if isinstance(merged, Tensor) else type(merged).__name__
                    raise ShapeError(f"merge_tensor returned {got} for {key!r}, whose inputs are {shape}; a merge "
                                     "must return one tensor shaped like its inputs")
                written += _write_tensor(f, merged.detach().to("cpu", out_dtype).contiguous())
                del merged
                if progress is not None:
                    progress(i + 1, len(plan), key)
            if written != len(head) + data_bytes:  # an internal error, not the user's
                raise RuntimeError(f"wrote {written} bytes to {out}, expected {len(head) + data_bytes}")
        seconds = time.perf_counter() - t0
        report = StreamReport(out_path=out, tensors=len(plan), bytes_read=bytes_read, bytes_written=written,
                              seconds=seconds, peak_rss_delta_bytes=mem.rss_delta_bytes, rss_source=mem.rss_source)
        if compare_read:
            report.read_once_seconds = read_once_seconds([*srcs, *([base_src] if base_src is not None else [])])
    log.info("merged %d tensors into %s in %.2f s: read %.1f MiB, wrote %.1f MiB, peak RSS +%.1f MiB",
             report.tensors, out, seconds, bytes_read / 2**20, written / 2**20, report.peak_rss_delta_bytes / 2**20)
    return report
