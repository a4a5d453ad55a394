"""The sparse family's plug-in: its recipe section (``sparse:``), its bench suites and its export format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import edgetune.sparse
import edgetune.sparse.bench  # noqa: F401  (registers the ``sparse`` and ``sparse-quality`` suites)
from edgetune.core.plugins import EXPORTS, ExportFormat


def _export(run: Any, run_dir: Path, out_dir: Path | None, *, fast: bool = False) -> dict[str, Any]:
    from edgetune.sparse.export import StorageRule, export_run

    rep = export_run(run, run_dir, out_dir, rule=StorageRule() if fast else None)
    rep["message"] = (f"{rep['bytes_before']} -> {rep['bytes_after']} bytes, widths {rep['widths_before']} -> "
                      f"{rep['widths_after']}, latency batch 1 {rep['latency_ms_batch1_before']:.3f} -> "
                      f"{rep['latency_ms_batch1_after']:.3f} ms, test accuracy {rep['test_acc_before']:.4f} -> "
                      f"{rep['test_acc_after']:.4f}")
    return rep


def _sparse(cfg: Any) -> bool:
    return getattr(cfg, "sparse", None) is not None


EXPORTS.add("sparse-compact", ExportFormat(export=_export, applies=_sparse),
            summary="smallest file: each layer sparse wherever that takes fewer bytes, dead neurons removed (MLPs); "
                    "reloads with edgetune.sparse.export.load_exported")
EXPORTS.add("sparse-fast", ExportFormat(export=lambda run, d, o: _export(run, d, o, fast=True), applies=lambda cfg: False),
            summary="CPU-latency storage rule: layers above 6% density stored dense (may be larger than the run's "
                    "model); dead neurons removed (MLPs)")
