"""Image classification datasets read from their standard files: Fashion-MNIST, MNIST, EMNIST (IDX),
CIFAR-10/100 (python pickle batches), and scikit-learn's bundled 8x8 digits (offline).

Every loader keeps uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)`` in memory and sets the bundle's
``transform`` to :class:`~edgetune.data.transforms.ToFloat`, which turns each batch into float32 in [0, 1]
on the device (digits: 0..16 divided by 16). The folders are found by
:func:`edgetune.data.locate.find_dataset` (``data.path``, ``$EDGETUNE_DATA``, /usr/share/datasets; a
``data.path`` given is used or refused, never replaced).
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from edgetune.core.config import Config
from edgetune.core.errors import DataError
from edgetune.data.base import DataBundle, DataConfig, loader_options, register_dataset
from edgetune.data.common import images_to_uint8, make_bundle, stratified_holdout
from edgetune.data.idx import read_idx_pair
from edgetune.data.locate import find_dataset
from edgetune.data.transforms import ToFloat

__all__ = ["FASHION_MNIST_CLASSES", "Cifar100Options", "DigitsOptions", "EmnistOptions", "read_cifar_pickle"]

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_DIGITS = [str(i) for i in range(10)]
_UPPER = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
_LOWER = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_EMNIST_CLASSES: dict[str, list[str]] = {
    "byclass": _DIGITS + _UPPER + _LOWER,
    "bymerge": _DIGITS + _UPPER + list("abdefghnqrt"),
    "balanced": _DIGITS + _UPPER + list("abdefghnqrt"),
    "letters": [f"{u}/{lo}" for u, lo in zip(_UPPER, _LOWER)],
    "digits": _DIGITS,
    "mnist": _DIGITS,
}
_ENV_HINT = "pass data.path=FOLDER or set EDGETUNE_DATA to a folder holding it (or its subfolder '{name}')"


def _idx_files(prefix: str, test_part: str) -> dict[str, list[str]]:
    """Accepted names of the four IDX files, e.g. ``train-images-idx3-ubyte`` and ``train-images.idx3-ubyte``."""
    out = {}
    for split, part in (("train", "train"), ("test", test_part)):
        for kind, code in (("images", "idx3"), ("labels", "idx1")):
            stem = f"{prefix}{part}-{kind}"
            out[f"{split}_{kind}"] = [f"{stem}-{code}-ubyte", f"{stem}.{code}-ubyte"]
    return out


def _load_idx_dataset(
    cfg: DataConfig,
    name: str,
    *,
    prefix: str = "",
    test_part: str = "t10k",
    subdirs: tuple[str, ...] = (),
    how_to_get: str,
    transpose: bool = False,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], Path]:
    """Find and read the four IDX files; returns ``(x, y)`` for train and test and the folder used."""
    files = find_dataset(
        name, cfg.path, _idx_files(prefix, test_part), subdirs=subdirs, how_to_get=how_to_get
    )
    splits = []
    for split in ("train", "test"):
        x, y = read_idx_pair(files[f"{split}_images"], files[f"{split}_labels"])
        if transpose:
            x = x.transpose(0, 2, 1)
        splits.append((images_to_uint8(x), torch.from_numpy(y.astype(np.int64))))
    return splits[0], splits[1], files["train_images"].parent


@register_dataset(
    "fashion-mnist", summary="Fashion-MNIST: 28x28 grey clothing, 10 classes, 60k/10k (IDX files)"
)
def load_fashion_mnist(cfg: DataConfig) -> DataBundle:
    """Fashion-MNIST (Xiao et al. 2017): ``(1, 28, 28)`` images, 10 classes, 60000 train / 10000 test."""
    how = (
        "To get it: on Debian/Ubuntu run `apt-get install dataset-fashion-mnist` (installs "
        "/usr/share/datasets/fashion-mnist); otherwise download the four IDX files (train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from "
        f"github.com/zalandoresearch/fashion-mnist into a folder and {_ENV_HINT.format(name='fashion-mnist')}."
    )
    train, test, src = _load_idx_dataset(cfg, "fashion-mnist", subdirs=("fashion_mnist",), how_to_get=how)
    return make_bundle(
        cfg,
        name="fashion-mnist",
        task="classification",
        train=train,
        test=test,
        num_classes=10,
        class_names=FASHION_MNIST_CLASSES,
        source=str(src),
        transform=ToFloat(),
    )


@register_dataset("mnist", summary="MNIST: 28x28 grey handwritten digits, 10 classes, 60k/10k (IDX files)")
def load_mnist(cfg: DataConfig) -> DataBundle:
    """MNIST (LeCun et al. 1998): ``(1, 28, 28)`` images, 10 classes, 60000 train / 10000 test."""
    how = (
        "To get it: download the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from an MNIST mirror into a folder and "
        f"{_ENV_HINT.format(name='mnist')}."
    )
    train, test, src = _load_idx_dataset(cfg, "mnist", how_to_get=how)
    return make_bundle(
        cfg,
        name="mnist",
        task="classification",
        train=train,
        test=test,
        num_classes=10,
        class_names=_DIGITS,
        source=str(src),
        transform=ToFloat(),
    )


class EmnistOptions(Config):
    """split: which EMNIST split (files ``emnist-<split>-{train,test}-{images,labels}-idx?-ubyte[.gz]``)."""

    split: Literal["byclass", "bymerge", "balanced", "letters", "digits", "mnist"] = "balanced"


@register_dataset(
    "emnist", config=EmnistOptions, summary="EMNIST: 28x28 grey characters, split by option (IDX)"
)
def load_emnist(cfg: DataConfig) -> DataBundle:
    """EMNIST (Cohen et al. 2017), ``(1, 28, 28)``; images are stored transposed in the files and fixed here.

    The ``letters`` split stores labels 1..26; they are shifted to 0..25.
    """
    opts: EmnistOptions = loader_options(cfg, EmnistOptions)
    how = (
        "To get it: download the EMNIST 'gzip.zip' archive from nist.gov (the EMNIST page), unpack it and "
        f"{_ENV_HINT.format(name='emnist')}; the folder must hold emnist-{opts.split}-train-images-idx3-ubyte.gz "
        "and the three other files of that split."
    )
    train, test, src = _load_idx_dataset(
        cfg,
        "emnist",
        prefix=f"emnist-{opts.split}-",
        test_part="test",
        subdirs=("gzip",),
        how_to_get=how,
        transpose=True,
    )
    if opts.split == "letters":
        train, test = (train[0], train[1] - 1), (test[0], test[1] - 1)
    names = _EMNIST_CLASSES[opts.split]
    return make_bundle(
        cfg,
        name="emnist",
        task="classification",
        train=train,
        test=test,
        num_classes=len(names),
        class_names=names,
        source=f"{src} (split {opts.split})",
        transform=ToFloat(),
    )


# ----------------------------------------------------------------------------------------------- CIFAR

_NUMPY_CORE = "numpy._core" if hasattr(np, "_core") else "numpy.core"
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a CIFAR file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        canon = module.replace("numpy.core", "numpy._core", 1) if module.startswith("numpy.core") else module
        if (canon, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if canon.startswith("numpy._core"):
            canon = canon.replace("numpy._core", _NUMPY_CORE, 1)
        return getattr(importlib.import_module(canon), name)


def read_cifar_pickle(path: str | Path) -> dict[bytes, Any]:
    """Read one CIFAR python batch/meta file (keys are bytes, as written by Python 2)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            obj = _SafeUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise DataError(
            f"{str(path)!r} is not a readable CIFAR python batch file ({type(err).__name__}: {err}). It may be "
            "truncated or not the 'python version' of CIFAR; download cifar-*-python.tar.gz again and unpack it."
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{str(path)!r} holds a {type(obj).__name__}, not a CIFAR batch dict; re-download it."
        )
    return obj


def _cifar_split(paths: list[Path], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for p in paths:
        batch = read_cifar_pickle(p)
        if b"data" not in batch or label_key not in batch:
            raise DataError(f"CIFAR file {str(p)!r} lacks the key b'data' or {label_key!r}; re-download it.")
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise DataError(
                f"CIFAR file {str(p)!r} holds data of shape {data.shape} ({data.dtype}) and {len(labels)} labels; "
                "expected uint8 (N, 3072) with N labels. The file is damaged; re-download it."
            )
        xs.append(data.reshape(-1, 3, 32, 32))  # rows are 1024 red, 1024 green, 1024 blue values
        ys.append(labels)
    return images_to_uint8(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _names(meta: dict[bytes, Any], key: bytes) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(key, [])]


_CIFAR_HOW = (
    "To get it: download {archive} (the 'python version') from www.cs.toronto.edu/~kriz/cifar.html, unpack it "
    "and " + _ENV_HINT
)


@register_dataset("cifar10", summary="CIFAR-10: 32x32 colour, 10 classes, 50k/10k (python batches)")
def load_cifar10(cfg: DataConfig) -> DataBundle:
    """CIFAR-10 (Krizhevsky 2009): ``(3, 32, 32)`` images, 10 classes, from ``cifar-10-batches-py``."""
    files = {f"data_batch_{i}": [f"data_batch_{i}"] for i in range(1, 6)}
    files |= {"test_batch": ["test_batch"], "meta": ["batches.meta"]}
    how = _CIFAR_HOW.format(archive="cifar-10-python.tar.gz", name="cifar10")
    found = find_dataset(
        "cifar10",
        cfg.path,
        files,
        subdirs=("cifar-10-batches-py", "cifar10/cifar-10-batches-py"),
        how_to_get=how,
    )
    train = _cifar_split([found[f"data_batch_{i}"] for i in range(1, 6)], b"labels")
    test = _cifar_split([found["test_batch"]], b"labels")
    names = _names(read_cifar_pickle(found["meta"]), b"label_names")
    return make_bundle(
        cfg,
        name="cifar10",
        task="classification",
        train=train,
        test=test,
        num_classes=10,
        class_names=names,
        source=str(found["meta"].parent),
        transform=ToFloat(),
    )


class Cifar100Options(Config):
    """label_mode: ``fine`` (100 classes) or ``coarse`` (20 superclasses)."""

    label_mode: Literal["fine", "coarse"] = "fine"


@register_dataset("cifar100", config=Cifar100Options, summary="CIFAR-100: 32x32 colour, 100 (or 20) classes")
def load_cifar100(cfg: DataConfig) -> DataBundle:
    """CIFAR-100 (Krizhevsky 2009): ``(3, 32, 32)`` images, 50000/10000, from ``cifar-100-python``."""
    opts: Cifar100Options = loader_options(cfg, Cifar100Options)
    how = _CIFAR_HOW.format(archive="cifar-100-python.tar.gz", name="cifar100")
    found = find_dataset(
        "cifar100",
        cfg.path,
        {"train": ["train"], "test": ["test"], "meta": ["meta"]},
        subdirs=("cifar-100-python", "cifar100/cifar-100-python"),
        how_to_get=how,
    )
    key = f"{opts.label_mode}_labels".encode()
    train, test = _cifar_split([found["train"]], key), _cifar_split([found["test"]], key)
    names = _names(read_cifar_pickle(found["meta"]), f"{opts.label_mode}_label_names".encode())
    return make_bundle(
        cfg,
        name="cifar100",
        task="classification",
        train=train,
        test=test,
        num_classes=100 if opts.label_mode == "fine" else 20,
        class_names=names,
        source=f"{found['meta'].parent} ({opts.label_mode} labels)",
        transform=ToFloat(),
    )


# ----------------------------------------------------------------------------------------------- digits


class DigitsOptions(Config):
    """test_fraction: fraction of each class held out as the test split (seeded by data.seed)."""

    test_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)


@register_dataset(
    "digits", config=DigitsOptions, summary="scikit-learn's bundled 8x8 digits, 10 classes (offline)"
)
def load_digits(cfg: DataConfig) -> DataBundle:
    """The 1797 8x8 handwritten digits bundled with scikit-learn: uint8 ``(1, 8, 8)`` in 0..16, 10 classes;
    the transform divides by 16 (float32 in [0, 1]).

    Train/test is a stratified split drawn with ``data.seed`` (``test_fraction`` of each class to test).
    """
    opts: DigitsOptions = loader_options(cfg, DigitsOptions)
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError(
            "dataset 'digits' needs scikit-learn, which is not installed; run `pip install scikit-learn` "
            "(or `pip install edgetune[data]`)."
        ) from None
    raw = sk_load_digits()
    images = np.asarray(raw.images).astype(np.uint8)  # (1797, 8, 8), integer values 0..16
    labels = np.asarray(raw.target, dtype=np.int64)
    train_idx, test_idx = stratified_holdout(labels, opts.test_fraction, np.random.default_rng([cfg.seed, 0]))
    x = images_to_uint8(images)
    y = torch.from_numpy(labels)
    idx_tr, idx_te = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return make_bundle(
        cfg,
        name="digits",
        task="classification",
        train=(x[idx_tr], y[idx_tr]),
        test=(x[idx_te], y[idx_te]),
        num_classes=10,
        class_names=_DIGITS,
        source="sklearn.datasets.load_digits",
        transform=ToFloat(divisor=16.0),
    )
