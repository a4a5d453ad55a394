"""The sparse family's plug-in: its recipe section (``sparse:``), its bench suites and its export format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import edgetune.sparse
import edgetune.sparse.bench  # noqa: F401  (registers the ``sparse`` and ``sparse-quality`` suites)
from edgetune.core.plugins import EXPORTS, ExportFormat


def _export(run: Any, run_dir: Path, out_dir: Path | None) -> dict[str, Any]:
    from edgetune.sparse.export import export_run

    rep = export_run(run, run_dir, out_dir)
    rep["message"] = (f"{rep['bytes_before']} -> {rep['bytes_after']} bytes, widths {rep['widths_before']} -> "
                      f"{rep['widths_after']}, latency batch 1 {rep['latency_ms_batch1_before']:.3f} -> "
                      f"{rep['latency_ms_batch1_after']:.3f} ms, test accuracy {rep['test_acc_before']:.4f} -> "
                      f"{rep['test_acc_after']:.4f}")
    return rep


EXPORTS.add("sparse-compact", ExportFormat(export=_export, applies=lambda cfg: getattr(cfg, "sparse", None) is not None),
            summary="sparse storage per layer, dead neurons removed (MLPs); reloads with edgetune.sparse.export.load_exported")
