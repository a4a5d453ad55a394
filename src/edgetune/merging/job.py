"""A merge job on files: which models, which base, which method, where the result goes (``edgetune merge``).

A job file is flat YAML: ``models`` (paths, or ``{model: PATH, weight: W}``), ``base`` (the model the fine-tunes
started from, for the task-vector methods), ``output`` (a ``.safetensors`` file or a folder), and the method's
config beside them (``method: ties``, ``density: 0.2``, ...)::

    method: ties
    density: 0.2
    base: runs/pretrained/model.safetensors
    models: [runs/ft-a, {model: runs/ft-b, weight: 0.5}]
    output: merged/

A mergekit file (it has ``merge_method``) is read too: :mod:`edgetune.merging.mergekit`.

:func:`run_merge` streams the merge tensor by tensor (:func:`~edgetune.merging.stream.stream_merge`): peak memory
stays near one tensor per input. A folder output gets ``model.safetensors`` and, copied from the reference model's
folder (the base's when it is a folder, else model 0's), the files that make it loadable like that model: a
Hugging Face folder's config and tokenizer files, an edgetune run's ``config.yaml`` and ``model.json``; then
``merge.json`` with the job and what the merge measured. The job also goes into the safetensors metadata.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pydantic import Field, SerializeAsAny, field_validator

from edgetune.core.config import Config, apply_overrides, load_yaml, validate
from edgetune.core.errors import ConfigError
from edgetune.core.state import atomic_write_json, save_tensors
from edgetune.merging.base import check_options, copy_buffer, merge_state_dicts, merger_for
from edgetune.merging.config import MergeConfig
from edgetune.merging.sources import check_compatible, open_source, read_state_dict
from edgetune.merging.stream import StreamReport, stream_merge

__all__ = ["MergeJob", "MergeModel", "check_job", "load_job", "run_merge"]

log = logging.getLogger(__name__)

#: the job's own keys; every other key of a job file belongs to the method's config
JOB_KEYS = ("models", "base", "output")
#: files of a model folder that hold weights (not copied next to the merged weights)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")
#: files of an edgetune run folder that describe the model (the rest describe its training)
_RUN_FILES = ("config.yaml", "model.json")


class MergeModel(Config):
    """One model to merge: its path (a ``.safetensors`` file, a Hugging Face folder, an edgetune run folder or
    ``RUN/stages/NAME``) and, optionally, its weight."""

    model: str
    weight: float | None = None


class MergeJob(Config):
    """Models, base, output and the method's config (see the module docstring)."""

    models: list[MergeModel] = Field(min_length=1)
    base: str | None = None
    output: str
    merge: SerializeAsAny[MergeConfig]

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        if isinstance(v, (str, Path)):
            raise ValueError("models must be a list of paths (or {model: PATH, weight: W}), one per model")  # noqa: TRY004 (pydantic reports ValueError)
        if isinstance(v, list):
            return [{"model": str(m)} if isinstance(m, (str, Path)) else m for m in v]
        return v

    def weighted_config(self) -> MergeConfig:
        """The method's config with the per-model weights (``models[i].weight``) as its ``weights``."""
        given = [m.weight for m in self.models]
        if all(w is None for w in given):
            return self.merge
        if any(w is None for w in given):
            missing = [m.model for m in self.models if m.weight is None]
            raise ConfigError(f"some models have a weight and some do not ({', '.join(missing[:3])} have none); give "
                              "every model a weight, or none (equal weights)")
        if self.merge.weights is not None:
            raise ConfigError("weights are given twice: per model (models[i].weight) and as `weights`; keep one")
        return self.merge.model_copy(update={"weights": [float(w) for w in given]})  # type: ignore[misc]


def load_job(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = (),
             output: str | Path | None = None) -> MergeJob:
    """A :class:`MergeJob` from a job file or mapping (edgetune's flat format, or mergekit's when it has
    ``merge_method``), with ``key=value`` overrides applied first and ``output`` replacing the file's."""
    where = str(source) if not isinstance(source, Mapping) else "merge job"
    data = dict(source) if isinstance(source, Mapping) else load_yaml(source)
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a YAML mapping (method:, models:, base:, output:), not a "
                          f"{type(data).__name__}")
    data = apply_overrides(data, overrides)
    if "merge_method" in data:
        from edgetune.merging.mergekit import from_mergekit

        data = from_mergekit(data, where)
    if output is not None:
        data["output"] = str(output)
    if not data.get("output"):
        raise ConfigError(f"{where} says nothing about where the merged model goes: add `output: PATH` (a "
                          ".safetensors file or a folder) or pass --out PATH")
    nested = {k: data[k] for k in JOB_KEYS if k in data}
    nested["merge"] = validate(MergeConfig, {k: v for k, v in data.items() if k not in JOB_KEYS}, where)
    return validate(MergeJob, nested, where)


def _folder_of(spec: str) -> Path | None:
    """The folder a model path's weights are in (a run's stage folder for a staged run), or None for a file."""
    with open_source(spec) as src:
        files = src.files
    if not files or not Path(spec).is_dir():
        return None
    return Path(files[0]).parent


def _side_files(folder: Path) -> list[Path]:
    """The files of a model folder to copy beside merged weights."""
    if (folder / "model.json").is_file() and (folder / "config.yaml").is_file():
        return [folder / n for n in _RUN_FILES]
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)
                  and not p.name.endswith(".index.json"))


def _output_paths(output: str, create: bool = True) -> tuple[Path, Path | None]:
    """(the safetensors file to write, the folder for side files or None)."""
    out = Path(output).expanduser()
    if out.suffix == ".safetensors":
        if out.is_dir():
            raise ConfigError(f"output {out} is a folder; give a .safetensors file name or a folder path without "
                              "the .safetensors ending")
        if create:
            out.parent.mkdir(parents=True, exist_ok=True)
        return out, None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file but not a .safetensors file; give a folder or a .safetensors path")
    return out / "model.safetensors", out


def _merge_in_memory(job: MergeJob, cfg: MergeConfig, out_file: Path, recipe: dict[str, Any]) -> StreamReport:
    """A method that needs whole models (re-basin): read them, merge in memory, save atomically."""
    import time

    from edgetune.measure.memory import track_peak_memory

    t0 = time.perf_counter()
    with track_peak_memory(interval_s=0.005) as mem:
        models = [read_state_dict(m.model) for m in job.models]
        base = read_state_dict(job.base) if job.base else None
        merged = merge_state_dicts(models, cfg, base=base)
        save_tensors(merged, out_file, metadata={"edgetune.merge": json.dumps(recipe), "format": "pt"})
    size = sum(t.numel() * t.element_size() for m in [*models, *([base] if base else [])] for t in m.values())
    return StreamReport(out_path=out_file, tensors=len(merged), bytes_read=size, bytes_written=out_file.stat().st_size,
                        seconds=time.perf_counter() - t0, peak_rss_delta_bytes=mem.rss_delta_bytes,
                        rss_source=mem.rss_source)


def check_job(job: MergeJob) -> None:
    """Everything that can be checked without merging: the method's options against the number of models and the
    base, each input readable, every input of the same names and shapes (from the headers only)."""
    merger = merger_for(job.weighted_config())
    if merger.data_aware:
        raise ConfigError(f"method {merger.cfg.method!r} needs data and the model, which a merge job on files does not "
                          "have: run it as a merge stage of a recipe (step: merge, with the stage's data), or call "
                          "edgetune.merging.merge_with_data in Python")
    check_options(merger, len(job.models), job.base is not None)
    with ExitStack() as stack:
        sources = [stack.enter_context(open_source(m.model)) for m in job.models]
        base = stack.enter_context(open_source(job.base)) if job.base else None
        check_compatible(sources, base)
        out_file, out_dir = _output_paths(job.output, create=False)
        if out_dir is not None and out_dir.is_dir():
            stale = sorted(p.name for p in out_dir.iterdir() if p.name.endswith(".index.json")
                           or (p.suffix in _WEIGHT_SUFFIXES and p.name != "model.safetensors"))
            if stale:
                raise ConfigError(f"output folder {out_dir} holds other weights ({', '.join(stale[:3])}) that would sit "
                                  "beside the merged model.safetensors and be loaded instead of it; give a new or "
                                  "empty folder")
        for src in [*sources, *([base] if base is not None else [])]:
            if any(Path(f).resolve() == out_file.resolve() for f in src.files):
                raise ConfigError(f"output {out_file} is one of the inputs ({src.name}); the merge would replace it. "
                                  "Write the merged model somewhere else")
        # integer buffers (position ids, counters) must agree: checked here, not hours into a stream
        for key in sources[0]:
            if not sources[0].dtype(key).is_floating_point and not key.endswith("num_batches_tracked"):
                copy_buffer(key, [s.get(key) for s in sources])


def run_merge(job: MergeJob, progress: Callable[[int, int, str], None] | None = None,
              compare_read: bool = False) -> StreamReport:
    """Run ``job``: check everything, stream the merge into its output, copy the side files, write merge.json."""
    check_job(job)  # before any output exists
    cfg = job.weighted_config()
    merger = merger_for(cfg)
    specs = [m.model for m in job.models]
    out_file, out_dir = _output_paths(job.output)
    ref = _folder_of(job.base) if job.base else None
    ref = ref or _folder_of(specs[0])
    recipe = {"job": job.model_dump(mode="json"), "method": cfg.model_dump(mode="json")}
    created = out_dir is not None and not out_dir.exists()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if merger.whole_model:  # re-basin: every tensor at once, in memory
            report = _merge_in_memory(job, cfg, out_file, recipe)
        else:
            report = stream_merge(specs, merger, out_file, base=job.base, metadata={"edgetune.merge": recipe},
                                  progress=progress, compare_read=compare_read)
    except BaseException:
        if created and out_dir is not None and not any(out_dir.iterdir()):
            out_dir.rmdir()  # no empty folder left behind by a failed or interrupted merge
        raise
    if out_dir is not None:
        copied = []
        if ref is not None and ref.resolve() != out_dir.resolve():
            for f in _side_files(ref):
                shutil.copy2(f, out_dir / f.name)
                copied.append(f.name)
        info = {**recipe, "copied_from": str(ref) if ref else None, "copied": copied, "report": report.to_dict()}
        atomic_write_json(out_dir / "merge.json", info)
    return report
