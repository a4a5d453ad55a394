"""Append-only metrics log (JSON lines), mirrored to TensorBoard when it is installed."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "read_metrics"]

log = logging.getLogger(__name__)


class MetricsLog:
    """One JSON object per line; ``truncate_after(step)`` drops records a resumed run will write again."""

    def __init__(self, path: str | Path, tensorboard: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None and "step" in record:
            kind = record.get("kind", "metric")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def truncate_to(self, n: int) -> None:
        """Keep the first ``n`` records (those written before the checkpoint a run resumes from)."""
        if not self.path.exists():
            return
        keep = read_metrics(self.path)[:n]
        self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep), encoding="utf-8")

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep), encoding="utf-8")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a malformed line in %s", path)  # a line cut by a crash
    return records
