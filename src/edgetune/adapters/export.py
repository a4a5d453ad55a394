"""Exports of a finished adapter run: the model with its adapters merged away, or the adapter alone.

``adapter-merged`` folds every adapter into its layer's weight and takes the wrappers off, so the exported model
has exactly the base architecture (same modules, same speed) and reloads without edgetune: ``model.safetensors``
holds its state dict, and a Hugging Face network inside it is also written with ``save_pretrained`` (``hf/``).
``adapter-peft`` writes the adapter alone in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``).
Both check the exported model against the run's model on a test batch and report the largest difference.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetune.adapters.model import adapter_layers, adapter_names, remove_adapters_
from edgetune.core.errors import ConfigError
from edgetune.core.state import save_tensors

__all__ = ["export_merged", "export_peft"]

log = logging.getLogger(__name__)


def _hf_model(model: nn.Module) -> nn.Module | None:
    """The outermost Hugging Face ``PreTrainedModel`` inside ``model`` (itself included), if any."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def _test_batch(run: Any) -> tuple[Any, Any] | None:
    """One preprocessed test batch of the run's data and the task's forward, or None without data."""
    from edgetune.data.batches import take, to_device
    from edgetune.data.text_classification import TextDataset
    from edgetune.train.tasks import get_task

    bundle = run.bundle
    if bundle is None or bundle.test is None or len(bundle.test) == 0:
        return None
    if isinstance(bundle.test, TextDataset):
        from edgetune.data.tokenize import tokenize_bundle

        bundle = tokenize_bundle(bundle, run.loaded.tokenizer, run.cfg.model.max_length)
    batch = to_device(take(bundle.test, torch.arange(min(8, len(bundle.test)))), torch.device("cpu"))
    transform = run.loaded.transform
    if bundle.transform is not None:
        batch = bundle.transform(batch)
    if transform is not None:
        batch = transform(batch)
    return batch, get_task(run.loaded.task).forward


def _outputs(model: nn.Module, probe: tuple[Any, Any] | None) -> torch.Tensor | None:
    if probe is None:
        return None
    batch, fwd = probe
    with torch.no_grad():
        out = fwd(model.eval(), batch)
    return getattr(out, "logits", out) if not isinstance(out, torch.Tensor) else out


def _check_adapters(run: Any) -> None:
    if not adapter_names(run.model):
        raise ConfigError(f"the run in {run.run_dir} has no adapter (its recipe has no adapter: section); export it "
                          "with another format (edgetune ls exports)")


def _check_mergeable(run: Any, run_dir: Path) -> None:
    """Refuse, before writing anything, a model whose adapters sit on layers without a dense weight."""
    kept = [f"{path} ({layer.info.type_name})" for path, layer in adapter_layers(run.model) if not layer.info.mergeable]
    if kept:
        shown = ", ".join(kept[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
        raise ConfigError(
            f"adapter-merged folds each adapter into its layer's dense weight, but the adapters of the run in "
            f"{run_dir} sit on layers with sparse storage: {shown}; merging would make them dense. Export the "
            f"adapter alone (edgetune export {run_dir} --format adapter-peft; load_adapter_ puts it back on the "
            "sparse base), and the sparse base from the stage that trained it (edgetune export RUN_DIR/stages/NAME)")


def export_merged(run: Any, run_dir: Path, out_dir: Path | None) -> dict[str, Any]:
    """Merge every adapter of the run's model into its weights, remove the wrappers and write the plain model."""
    _check_adapters(run)
    _check_mergeable(run, run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    probe = _probe(run)
    before = _outputs(run.model, probe)
    plain = remove_adapters_(copy.deepcopy(run.model), merge=True)
    after = _outputs(plain, probe)
    save_tensors(plain.state_dict(), out / "model.safetensors", metadata={"format": "edgetune-merged-adapter"})
    files = ["model.safetensors"]
    hf = _hf_model(plain)
    if hf is not None:
        hf.save_pretrained(out / "hf", safe_serialization=True)
        files.append("hf/")
    diff = float((after - before).abs().max()) if before is not None and after is not None else None
    msg = f"wrote {', '.join(files)}: {sum(p.numel() for p in plain.parameters())} parameters"
    if diff is not None:
        msg += f", largest output difference to the run's model {diff:.2e}"
    return {"out_dir": str(out), "files": files, "max_abs_diff": diff, "message": msg}


def export_peft(run: Any, run_dir: Path, out_dir: Path | None) -> dict[str, Any]:
    """Write each adapter of the run's model in PEFT's layout (one sub-folder per adapter when there are several)."""
    from edgetune.adapters.io import save_adapter

    _check_adapters(run)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "export"
    names = adapter_names(run.model)
    files: list[str] = []
    for name in names:
        folder = out if len(names) == 1 else out / name
        files += [str(p) for p in save_adapter(run.model, folder, name=name)]
    return {"out_dir": str(out), "files": files, "message": f"adapters {names} -> {', '.join(files)}"}


def _probe(run: Any) -> tuple[Any, Any] | None:
    try:
        return _test_batch(run)
    except Exception as err:  # noqa: BLE001  (the check is a courtesy; the export itself does not need data)
        log.warning("no test batch to check the export against (%s: %s)", type(err).__name__, err)
        return None
