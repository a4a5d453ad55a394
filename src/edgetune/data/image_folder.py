"""``image-folder``: image classification from a folder of class subfolders (decoded with Pillow).

Layout: ``data.path/<class>/*.{png,jpg,jpeg,bmp,gif}``, or ``data.path/train/<class>/...`` plus
``data.path/test/<class>/...``. Without ``train/`` and ``test/`` a seeded stratified ``test_fraction`` of
each class is the test split. Class names are the sorted subfolder names. Images are converted to grey
(``mode: grey``, 1 channel) or RGB (3 channels), resized to ``size`` when given (else they must all share
one size), and kept as uint8 ``(N, C, H, W)``; the bundle's transform makes float32 in [0, 1] per batch.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from edgetune.core.config import Config
from edgetune.core.errors import ConfigError, DataError
from edgetune.data.base import DataBundle, DataConfig, loader_options, register_dataset
from edgetune.data.common import make_bundle
from edgetune.data.text_classification import check_classes, holdout_split
from edgetune.data.transforms import ToFloat

__all__ = ["IMAGE_SUFFIXES", "ImageFolderOptions", "decode_image", "list_image_folder"]

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
_SHOW = 5  # bad files named in a message


class ImageFolderOptions(Config):
    """size: side (or ``[height, width]``) every image is resized to (bilinear); None keeps them as they
    are, and they must then share one size. mode: ``rgb`` (3 channels) or ``grey`` (1). skip_bad: skip
    unreadable files with a warning instead of failing. test_fraction / split_seed: the seeded split used
    when there are no train/ and test/ subfolders."""

    size: int | tuple[int, int] | None = None
    mode: Literal["rgb", "grey"] = "rgb"
    skip_bad: bool = False
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    split_seed: int = 0


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """Sorted class folder names of ``root`` and ``(file, class name)`` for each image file, sorted."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [
        (f, c)
        for c in classes
        for f in sorted((root / c).iterdir())
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
    ]
    return classes, files


def decode_image(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """Decode one file to uint8 ``(H, W)`` (grey) or ``(H, W, 3)`` (rgb), resized to ``size = (H, W)``.

    Raises OSError / ValueError (from Pillow) when the file is not a readable image.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. palette-transparency notes: we convert the mode anyway
        with Image.open(path) as im:
            im.load()
            img = im.convert("L" if mode == "grey" else "RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)


def _decode_all(
    files: list[tuple[Path, str]], opts: ImageFolderOptions, size: tuple[int, int] | None
) -> tuple[list[np.ndarray], list[tuple[Path, str]], list[str]]:
    from PIL import Image

    unreadable = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
    images, kept, bad = [], [], []
    for f, c in files:
        try:
            images.append(decode_image(f, opts.mode, size))
            kept.append((f, c))
        except unreadable as err:
            bad.append(f"{f} ({type(err).__name__}: {err})")
    return images, kept, bad


def _stack(images: list[np.ndarray], kept: list[tuple[Path, str]], root: Path) -> torch.Tensor:
    """uint8 ``(N, C, H, W)``; :class:`DataError` listing the sizes when they differ."""
    shapes = Counter(im.shape[:2] for im in images)
    if len(shapes) > 1:
        example = {}
        for im, (f, _) in zip(images, kept):
            example.setdefault(im.shape[:2], f.name)
        listed = "; ".join(
            f"{h}x{w}: {n} files, e.g. {example[(h, w)]}" for (h, w), n in shapes.most_common(3)
        )
        (h, w), _ = shapes.most_common(1)[0]
        raise DataError(
            f"images in {str(root)!r} come in {len(shapes)} sizes (height x width: {listed}). Set "
            f"data.options.size to resize them all, e.g. data.options.size={h} or data.options.size=[{h}, {w}]."
        )
    x = np.stack(images)  # (N, H, W) or (N, H, W, 3)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


def _read_split(
    root: Path, classes: list[str], opts: ImageFolderOptions, size: tuple[int, int] | None, notes: list[str]
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[Path, str]]]:
    found, files = list_image_folder(root)
    stray = sorted(set(found) - set(classes))
    if stray:
        raise DataError(
            f"image folder {str(root)!r} has class folders {stray} that the training folder lacks; every "
            "test class needs training images (add them to train/ or remove them from test/)."
        )
    images, kept, bad = _decode_all(files, opts, size)
    if bad:
        shown = "; ".join(bad[:_SHOW]) + (f"; and {len(bad) - _SHOW} more" if len(bad) > _SHOW else "")
        if not opts.skip_bad:
            raise DataError(
                f"{len(bad)} of {len(files)} image files in {str(root)!r} cannot be read: {shown}. Remove or "
                "replace them, or set data.options.skip_bad=true to skip them."
            )
        note = f"image-folder: skipped {len(bad)} unreadable files in {root}: {shown}"
        log.warning(note)
        notes.append(note)
    if not images:
        raise DataError(
            f"image folder {str(root)!r} holds no readable images ({', '.join(IMAGE_SUFFIXES)}) in class "
            "subfolders; the layout is data.path/<class>/<image> (or data.path/train/<class>/<image>)."
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[c] for _, c in kept], dtype=torch.int64)
    return _stack(images, kept, root), labels, kept


@register_dataset(
    "image-folder", config=ImageFolderOptions, summary="your images in class subfolders (data.path)"
)
def load_image_folder(cfg: DataConfig) -> DataBundle:
    """Images in ``data.path/<class>/`` (or ``train/`` and ``test/`` subfolders): uint8 ``(N, C, H, W)``."""
    opts: ImageFolderOptions = loader_options(cfg, ImageFolderOptions)
    if not cfg.path:
        raise ConfigError(
            "dataset 'image-folder' reads your own images: set data.path to a folder holding one subfolder "
            "per class (or train/ and test/ folders that each hold the class subfolders)."
        )
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset 'image-folder': data.path {str(root)!r} is not a folder; fix the path.")
    size = (opts.size, opts.size) if isinstance(opts.size, int) else opts.size
    if size is not None and min(size) < 1:
        raise ConfigError(f"data.options.size must be positive, got {opts.size}")
    split_dirs = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if split_dirs else root
    classes, _ = list_image_folder(train_root)
    notes: list[str] = []
    x, y, _ = _read_split(train_root, classes, opts, size, notes)
    check_classes("image-folder", y, classes, where=str(train_root))
    if split_dirs:
        x_te, y_te, _ = _read_split(root / "test", classes, opts, size, notes)
        if x_te.shape[2:] != x.shape[2:]:
            raise DataError(
                f"images in {str(root / 'test')!r} are {x_te.shape[2]}x{x_te.shape[3]} but those in "
                f"{str(train_root)!r} are {x.shape[2]}x{x.shape[3]}; set data.options.size to resize both."
            )
        train, test = (x, y), (x_te, y_te)
        source = f"{root} (train/ and test/)"
    else:
        tr, te = holdout_split(y.numpy(), opts.test_fraction, opts.split_seed)
        tr_i, te_i = torch.from_numpy(tr), torch.from_numpy(te)
        train, test = (x[tr_i], y[tr_i]), (x[te_i], y[te_i])
        source = f"{root} (test: {opts.test_fraction:g} of each class, split seed {opts.split_seed})"
    return make_bundle(
        cfg,
        name="image-folder",
        task="classification",
        train=train,
        test=test,
        num_classes=len(classes),
        class_names=classes,
        source=source,
        notes=notes,
        transform=ToFloat(),
    )
