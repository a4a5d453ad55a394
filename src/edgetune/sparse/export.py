"""Export a trained sparse model as a compact, self-describing folder, and load it back.

An export folder holds ``model.safetensors`` and ``manifest.json`` (architecture, per-layer storage,
SHA-256 of the tensor file); :func:`load_exported` rebuilds the model from that folder alone. MLPs are
compacted first (:mod:`edgetune.sparse.compact`: dead neurons removed, each layer sparse or dense, whichever
is cheaper) and rebuilt from the manifest's layer list; other models (exported without neuron removal) are
rebuilt from the model registry (``builder`` in the manifest: model name, options, input shape, classes)
with their sparse layers put back, which works as long as sparse layers are the only change a recipe made
to the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgetune.core.errors import CheckpointError, ConfigError
from edgetune.core.state import atomic_write_json, load_tensors, save_tensors, sha256_file
from edgetune.core.surgery import replace_module
from edgetune.sparse.compact import (
    CompactionReport,
    StorageRule,
    apply_storage_rule_,
    choose_storage,
    compact_mlp_,
    mlp_parts,
)
from edgetune.sparse.layer import SparseLinear

#: the storage rule of a compact export: bytes only (sparse wherever it is smaller)
SMALLEST = StorageRule(max_sparse_density=1.0)

__all__ = [
    "FORMAT",
    "SMALLEST",
    "VERSION",
    "CompactionReport",
    "StorageRule",
    "apply_storage_rule_",
    "choose_storage",
    "compact_mlp_",
    "export_run",
    "load_exported",
    "save_exported",
]

log = logging.getLogger(__name__)

FORMAT, VERSION = "edgetune-export", 1
MANIFEST, TENSORS = "manifest.json", "model.safetensors"


# ---------------------------------------------------------------- export folder
def _layer_entry(name: str, layer: nn.Module) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "kind": "sparse" if isinstance(layer, SparseLinear) else "dense",
                             "in_features": layer.in_features, "out_features": layer.out_features,
                             "bias": layer.bias is not None}
    if isinstance(layer, SparseLinear):
        entry.update(nnz=layer.nnz(), backend=layer.backend)
    return entry


def _architecture(model: nn.Module, builder: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    try:
        chain, norms, act = mlp_parts(model)
    except ConfigError as err:
        if builder is None:
            raise ConfigError(f"{err}. To export a model that is not an MLP, pass builder={{'name', "
                              "'options', 'input_shape', 'num_classes', 'task'} (the arguments of "
                              "edgetune.models.build_model)") from None
        sparse = {n: _layer_entry(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)}
        return str(builder["name"]), {"builder": dict(builder), "sparse_layers": sparse}
    names = [*(f"layers.{i}" for i in range(len(chain) - 1)), "head"]
    arch: dict[str, Any] = {"in_features": chain[0].in_features, "num_classes": chain[-1].out_features,
                            "activation": act, "batch_norm": norms is not None,
                            "layers": [_layer_entry(n, m) for n, m in zip(names, chain, strict=True)]}
    if norms is not None:
        arch["norms"] = [{"eps": n.eps, "momentum": n.momentum, "affine": n.affine} for n in norms]
    return "mlp", arch


def save_exported(model: nn.Module, out_dir: str | Path, *, meta: Mapping[str, Any] | None = None,
                  builder: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (its state dict: sparse layers as int32 ``indices`` + ``values``) and
    ``manifest.json`` into ``out_dir``, each atomically, the manifest last. ``meta`` (JSON-able) is
    stored as is. An MLP is described by its layer list; any other model needs ``builder``
    (``name``, ``options``, ``input_shape``, ``num_classes``, ``task`` for the model registry)."""
    out = Path(out_dir)
    name, arch = _architecture(model, builder)
    floats = [t.dtype for t in model.state_dict().values() if t.is_floating_point()]
    sha = save_tensors(model.state_dict(), out / TENSORS, metadata={"format": FORMAT})
    manifest = {"format": FORMAT, "version": VERSION, "model": name, "architecture": arch,
                "dtype": str(floats[0]).removeprefix("torch.") if floats else "float32",
                "tensors": {"file": TENSORS, "sha256": sha, "bytes": (out / TENSORS).stat().st_size},
                "meta": dict(meta or {})}
    atomic_write_json(out / MANIFEST, manifest)
    log.info("exported %s to %s (%d bytes of tensors)", name, out, manifest["tensors"]["bytes"])
    return out


def _read_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{out} is not an edgetune export folder: {path} is missing. Create one with "
                              f"`edgetune export RUN_DIR --out {out}` (or save_exported in Python)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the export is damaged: export the run "
                              "again") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != FORMAT:
        raise CheckpointError(f"{path} is not an edgetune export manifest (format {fmt!r}, expected "
                              f"{FORMAT!r}); point load_exported at a folder written by `edgetune export`")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} has export version {manifest.get('version')!r} but this edgetune "
                              f"reads version {VERSION}; use the edgetune release that wrote it, or export "
                              "the run again")
    return manifest


def _sparse_from(entry: Mapping[str, Any], sd: Mapping[str, Tensor], name: str, device: str) -> SparseLinear:
    return SparseLinear(entry["in_features"], entry["out_features"], sd[f"{name}.indices"],
                        sd[f"{name}.values"], bias=entry["bias"], backend=entry.get("backend", "auto"),
                        device=device)


def _build_mlp(arch: Mapping[str, Any], sd: Mapping[str, Tensor], device: str) -> nn.Module:
    from edgetune.models.mlp import MLP

    entries = arch["layers"]
    widths = [e["out_features"] for e in entries[:-1]]
    names = [*(f"layers.{i}" for i in range(len(widths))), "head"]
    if [e["name"] for e in entries] != names:
        raise KeyError(f"layer names {[e['name'] for e in entries]} (expected {names})")
    model = MLP(arch["in_features"], arch["num_classes"], widths, arch["activation"], arch["batch_norm"],
                device="meta")  # placeholders, replaced below: no memory, no init
    for e in entries:
        if e["kind"] == "sparse":
            new: nn.Module = _sparse_from(e, sd, e["name"], device)
        else:
            new = nn.utils.skip_init(nn.Linear, e["in_features"], e["out_features"], bias=e["bias"],
                                     device=device, dtype=sd[f"{e['name']}.weight"].dtype)
        replace_module(model, e["name"], new)
    for i, n in enumerate(arch.get("norms") or []):
        replace_module(model, f"norms.{i}", nn.BatchNorm1d(widths[i], eps=n["eps"], momentum=n["momentum"],
                                                           affine=n["affine"], device=device,
                                                           dtype=sd[f"norms.{i}.running_mean"].dtype))
    return model


def _build_registered(arch: Mapping[str, Any], sd: Mapping[str, Tensor], device: str,
                      dtype: str) -> nn.Module:
    from edgetune.models.base import ModelSpec, build_model

    b = arch["builder"]
    spec = ModelSpec(input_shape=tuple(b["input_shape"]), num_classes=b["num_classes"], task=b["task"])
    model = build_model(b["name"], b["options"], spec, device=device, dtype=getattr(torch, dtype))
    for fqn, e in arch["sparse_layers"].items():
        replace_module(model, fqn, _sparse_from(e, sd, fqn, device))
    return model


def load_exported(out_dir: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild an exported model from ``out_dir`` alone (manifest + tensors), in eval mode.

    Raises :class:`CheckpointError` when the folder is not an export, the tensor file's SHA-256 differs
    from the manifest's (corrupt or changed), or the tensors do not fit the manifest.
    """
    out = Path(out_dir)
    manifest = _read_manifest(out)
    tinfo = manifest.get("tensors")
    tinfo = tinfo if isinstance(tinfo, dict) else {}
    fname = str(tinfo.get("file", ""))
    tpath = out / fname
    if Path(fname).name != fname or not fname or not tpath.is_file():
        raise CheckpointError(f"{out / MANIFEST} names tensor file {fname!r}, which is not in {out}; "
                              "copy the whole export folder, or export the run again")
    sha = sha256_file(tpath)
    if sha != tinfo.get("sha256"):
        raise CheckpointError(f"{tpath} is corrupt or was changed after export: its sha256 {sha[:16]}... "
                              f"differs from {str(tinfo.get('sha256'))[:16]}... in {MANIFEST}; export the "
                              "run again")
    sd = load_tensors(tpath, device=device)
    try:
        arch = manifest["architecture"]
        if manifest.get("model") == "mlp":
            model = _build_mlp(arch, sd, device)
        else:
            model = _build_registered(arch, sd, device, manifest.get("dtype", "float32"))
        model.load_state_dict(sd, strict=True)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as err:
        hint = ("" if manifest.get("model") == "mlp" else " Models other than MLPs rebuild from the model "
                "registry, which works only when sparse layers were the recipe's only change to the model.")
        raise CheckpointError(f"{tpath} does not fit the architecture in {out / MANIFEST}: "
                              f"{type(err).__name__}: {err}.{hint} Export the run again.") from None
    return model.eval()


# ---------------------------------------------------------------- export a run folder
@torch.no_grad()
def _compare(reference: nn.Module, exported: nn.Module, tensors: tuple[Tensor, ...],
             batch: int = 512) -> dict[str, float]:
    """Test accuracy of both models (targets ``tensors[-1]``, -100 ignored) and their largest logit gap."""
    right = [0, 0]
    count, gap = 0, 0.0
    for i in range(0, len(tensors[0]), batch):
        xs, y = [t[i : i + batch] for t in tensors[:-1]], tensors[-1][i : i + batch].reshape(-1)
        valid = y != -100
        pair = (reference(*xs), exported(*xs))
        for k, logits in enumerate(pair):
            right[k] += int(((logits.reshape(-1, logits.shape[-1]).argmax(-1) == y) & valid).sum())
        gap = max(gap, float((pair[1].double() - pair[0].double()).abs().max()))
        count += int(valid.sum())
    n = max(count, 1)
    return {"test_acc_before": right[0] / n, "test_acc_after": right[1] / n, "max_abs_logit_diff": gap}


@torch.no_grad()
def _latency_ms(model: nn.Module, tensors: tuple[Tensor, ...], batch: int, repeats: int) -> float:
    from edgetune.measure import measure_latency

    xs = [t[:batch] for t in tensors[:-1]]
    return measure_latency(lambda: model(*xs), warmup=3, repeats=repeats).median_s * 1e3


def _refuse_wrapped(model: nn.Module, run_dir: Path) -> None:
    """Sparse exports write plain models: refuse layers another method wrapped (an adapter's ``base_layer``)."""
    wrapped = [n for n, m in model.named_modules() if isinstance(getattr(m, "base_layer", None), nn.Module)]
    if wrapped:
        shown = ", ".join(wrapped[:4]) + (f" and {len(wrapped) - 4} more" if len(wrapped) > 4 else "")
        raise ConfigError(
            f"the sparse exports write plain sparse models, but layers of the run in {run_dir} are wrapped by another "
            f"method (an adapter on {shown}). Export that method's part with its own format (edgetune ls exports; "
            "for an adapter: --format adapter-peft), and the sparse model from the stage that trained it "
            "(edgetune export RUN_DIR/stages/NAME)")


def export_run(run: Any, run_dir: str | Path, out_dir: str | Path | None = None, *,
               rule: StorageRule | None = None, latency_repeats: int = 20) -> dict[str, Any]:
    """Export the trained model of a finished run folder to ``out_dir`` (default ``RUN_DIR/export``).

    ``run`` is the run's model, recipe and data as the pipeline reloads them (``edgetune.runner.load_run_model``
    with ``with_data=True``; the ``edgetune export`` command passes it), so the family needs no pipeline import.

    MLPs are compacted (:func:`compact_mlp_`); other models keep their neurons and only get the storage
    rule. ``rule`` defaults to the smallest file (:data:`SMALLEST`: each layer stored sparse whenever that takes
    fewer bytes, so the export never grows the model); ``StorageRule()`` trades bytes for CPU latency. The export is reloaded with :func:`load_exported` and compared with the run's model on its test
    split. Returns (and writes as ``export_report.json``) bytes, parameters, non-zeros, widths, CPU
    latency (median ms at batch 1 and 256) and test accuracy, each before and after.
    """
    import copy

    from edgetune.measure import bytes_on_disk, count_nonzeros, count_parameters

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "export"
    rule = rule or SMALLEST
    model, cfg, bundle = run.model, run.cfg, run.bundle
    _refuse_wrapped(model, run_dir)
    reference = copy.deepcopy(model)
    test = tuple(bundle.test.tensors)
    if bundle.transform is not None:  # e.g. uint8 images to floats, as the model saw them in training
        test = tuple(bundle.transform(list(test)))
    report: dict[str, Any] = {"run_dir": str(run_dir), "out_dir": str(out), "model": cfg.model.name,
                              "bytes_before": bytes_on_disk(run_dir / "model.safetensors"),
                              "parameters_before": count_parameters(model),
                              "nonzeros_before": count_nonzeros(model)}
    try:
        mlp_parts(model)
        compaction: CompactionReport | None = compact_mlp_(model, rule=rule)
    except ConfigError as err:
        log.info("no neuron compaction (%s): applying the storage rule only", err)
        compaction = None
        apply_storage_rule_(model, rule)
    shape = list(bundle.input_shape)
    builder = {"name": cfg.model.name, "options": cfg.model.options(), "input_shape": shape,
               "num_classes": bundle.num_classes, "task": bundle.task}
    meta = {"source_run": str(run_dir.resolve()), "dataset": bundle.name, "input_shape": shape,
            "num_classes": bundle.num_classes, "task": bundle.task, "class_names": list(bundle.class_names),
            "compaction": compaction.as_dict() if compaction else None}
    save_exported(model, out, meta=meta, builder=builder)
    exported = load_exported(out)
    report.update({"bytes_after": bytes_on_disk(out / TENSORS),
                   "parameters_after": count_parameters(exported),
                   "nonzeros_after": count_nonzeros(exported), "compacted": compaction is not None,
                   "widths_before": list(compaction.widths_before) if compaction else None,
                   "widths_after": list(compaction.widths_after) if compaction else None,
                   "storage": list(compaction.storage) if compaction else None})
    report.update(_compare(reference, exported, test))
    for b in (1, 256):  # timings last: the files are written and compared from untouched weights
        report[f"latency_ms_batch{b}_before"] = _latency_ms(reference, test, b, latency_repeats)
        report[f"latency_ms_batch{b}_after"] = _latency_ms(exported, test, b, latency_repeats)
    atomic_write_json(out / "export_report.json", report)
    log.info("exported %s: %d -> %d bytes, test acc %.4f -> %.4f", run_dir, report["bytes_before"],
             report["bytes_after"], report["test_acc_before"], report["test_acc_after"])
    return report
