"""Causal LMs shipped as GGUF: dequantized once to a float32 Hugging Face folder, cached by the GGUF's sha256.

Converting (transformers + the ``gguf`` package) takes tens of seconds; the cached copy under
``$EDGETUNE_CACHE/gguf/<sha256>`` (default ``~/.cache/edgetune``) reloads in well under a second. The copy
is written to a temporary folder and renamed into place only when complete, and carries a manifest of
its files and sizes, so an interrupted or damaged copy is detected and rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from edgetune.core.errors import CheckpointError, EdgetuneError
from edgetune.models.pretrained.hf import float32_kwargs, load_hf, offline_hf, require_transformers
from edgetune.models.source import LoadedModel

__all__ = ["cache_root", "gguf_to_hf", "load_gguf_lm"]

log = logging.getLogger(__name__)

MANIFEST = "edgetune-manifest.json"


def cache_root() -> Path:
    """``$EDGETUNE_CACHE`` or ``~/.cache/edgetune``."""
    return Path(os.environ.get("EDGETUNE_CACHE") or "~/.cache/edgetune").expanduser()


def _complete(folder: Path, sha256: str) -> bool:
    """True when ``folder`` has a manifest for this GGUF and every listed file at its recorded size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        return (
            manifest.get("gguf_sha256") == sha256
            and bool(files)
            and all((folder / name).stat().st_size == size for name, size in files.items())
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _convert(gguf_path: Path, out: Path) -> None:
    tf = require_transformers()
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF; fail early with our message)
    except ImportError:
        raise EdgetuneError(
            "reading a GGUF model needs the `gguf` package, which is not installed; run "
            "`pip install 'edgetune[hf]'` (or `make models`)."
        ) from None
    log.info("converting %s to float32 (once; cached in %s)", gguf_path.name, out.parent)
    with offline_hf():
        try:
            tok = tf.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = tf.AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, **float32_kwargs()
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"could not convert the GGUF file {gguf_path} ({type(exc).__name__}: {exc}). The file may be "
                "damaged or use an architecture/quantization this transformers version cannot dequantize; "
                "reinstall its package or upgrade transformers and gguf."
            ) from exc
    model.hf_quantizer = None  # the weights are plain float32 now; save_pretrained must not re-quantize
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def gguf_to_hf(gguf_path: Path, sha256: str, *, rebuild: bool = False) -> Path:
    """The cached float32 HF folder for the GGUF file with checksum ``sha256``, converting it when needed."""
    target = cache_root() / "gguf" / sha256
    if not rebuild and _complete(target, sha256):
        return target
    if target.exists():
        log.warning("cached conversion %s is incomplete or damaged; rebuilding it", target)
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=target.parent))
    try:
        _convert(gguf_path, tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / MANIFEST).write_text(
            json.dumps({"gguf": gguf_path.name, "gguf_sha256": sha256, "files": files})
        )
        try:
            os.replace(tmp, target)
        except OSError:
            if not _complete(target, sha256):  # not a concurrent process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_gguf_lm(
    gguf_path: Path,
    sha256: str,
    *,
    task: str = "lm",
    num_classes: int | None = None,
    pool: str = "mean",
    source: str = "",
) -> LoadedModel:
    """Load the float32 copy of a GGUF model (converting and caching it on first use) via :func:`load_hf`.

    A cached copy that fails to load is rebuilt once from the GGUF file.
    """
    folder = gguf_to_hf(gguf_path, sha256)
    try:
        loaded = load_hf(folder, task=task, num_classes=num_classes, pool=pool, source=source or None)
    except CheckpointError as exc:
        log.warning("cached conversion %s does not load (%s); rebuilding it", folder, exc)
        folder = gguf_to_hf(gguf_path, sha256, rebuild=True)
        loaded = load_hf(folder, task=task, num_classes=num_classes, pool=pool, source=source or None)
    loaded.info["converted_from"] = str(gguf_path)
    return loaded
