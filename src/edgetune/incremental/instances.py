"""Object-conditioned bag of instances (OBoI): few-shot instance-level personalization without backpropagation.

Michieli, Moon, Kim, Ozay, "Object-Conditioned Bag of Instances for Few-Shot Personalized Instance
Recognition", ICASSP 2024, arXiv 2404.01397 (no official code; built from the paper's description, research
notes section 1.2). A detector gives an object class ("mug") and a box; the personal instance ("my mug") is
found among the instances of that class only:

1. region embedding: the box's part of a frozen feature map ``(C, h, w)`` is pooled into multi-order statistics
   ``[mean; std; ...]`` over its positions (:func:`region_moments`, with
   :func:`~edgetune.incremental.pooling.moment_pool` on a box mask), each order's block L2-normalized;
2. SimpleShot-style embedding (option ``center``): subtract the mean feature of base (non-personal) data, then
   L2-normalize (:func:`embed`);
3. instance prototype = normalized mean of its shots' embeddings; object prototype = normalized mean of the
   embeddings of every shot of its instances (plus any object-level examples given);
4. prediction: cosine to every instance prototype, arg-max restricted to the bag of the detected object class
   (:func:`bag_predict`; ``conditioned=False`` searches every instance). The object class is the caller's (the
   detector's output) or, when not given, the nearest object prototype's; :class:`BagPrediction` says which.

Choices of this implementation (the paper's exact ones could not be read, research notes [X]): the orders, the
per-order block normalization and the centering are options (defaults (1, 2), on, off); boxes are mapped to the
feature grid as every cell they touch (:func:`~edgetune.incremental.object_search.box_to_grid`). Instances are
kept as sums of unit embeddings and counts (exact save/load); every check runs before any change, so a
recognizer given bad input keeps its state.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from edgetune.core.config import Config, validate
from edgetune.core.errors import ConfigError, ShapeError, did_you_mean
from edgetune.incremental.files import read_tagged, write_tagged
from edgetune.incremental.object_search import box_to_grid
from edgetune.incremental.pooling import check_orders, moment_pool
from edgetune.incremental.prototypes import class_sums, cosine_scores, prototypes_from_sums

__all__ = ["BagConfig", "BagOfInstances", "BagPrediction", "bag_mask", "bag_predict", "box_masks", "crop_regions",
           "embed", "region_moments"]

log = logging.getLogger(__name__)

FORMAT = "edgetune-bag-of-instances"
VERSION = 1

Label = str | int


# ------------------------------------------------------------------------------------------------ the maths
def box_masks(boxes: Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """``(N, h, w)`` bool: the cells of an ``(h, w)`` feature grid that each pixel box touches.

    boxes: ``(N, 4)`` ``(x0, y0, x1, y1)`` pixels (end-exclusive) of ``(H, W)`` images."""
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ShapeError(f"boxes must be (N, 4) as (x0, y0, x1, y1) pixels, got {tuple(boxes.shape)}")
    out = torch.zeros(len(boxes), *grid, dtype=torch.bool)
    for i, box in enumerate(boxes.tolist()):
        r0, r1, c0, c1 = box_to_grid(tuple(box), image_size, grid)
        out[i, r0:r1, c0:c1] = True
    return out


def region_moments(fmap: Tensor, boxes: Tensor | None = None, image_size: tuple[int, int] | None = None,
                   orders: Sequence[int] = (1, 2), *, block_norm: bool = True) -> Tensor:
    """Multi-order statistics ``(N, len(orders) * C)`` of each feature map ``(N, C, h, w)`` over the positions
    of its box (every position when ``boxes`` is None): one block of C per order (mean, std, standardized
    higher moments), each L2-normalized when ``block_norm``.

    boxes: ``(N, 4)`` pixel boxes of the ``image_size = (H, W)`` images the maps were computed from."""
    if fmap.ndim != 4:
        raise ShapeError(f"feature maps must be (N, C, h, w), got {tuple(fmap.shape)}")
    mask = None
    if boxes is not None:
        if image_size is None:
            raise ConfigError("boxes are in pixels: give image_size=(H, W) of the images the maps come from")
        if len(boxes) != len(fmap):
            raise ShapeError(f"{len(boxes)} boxes for {len(fmap)} feature maps: give one box per image")
        mask = box_masks(boxes, image_size, (fmap.shape[2], fmap.shape[3])).to(fmap.device)
    return moment_pool(fmap, (2, 3), orders, mask, block_norm=block_norm)


def crop_regions(images: Tensor, boxes: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear crops ``(N, C, size, size)`` of ``images (N, C, H, W)`` to their pixel ``boxes (N, 4)`` (what
    a detector hands a recognizer); pixels outside the image read as zero."""
    if images.ndim != 4 or boxes.shape != (len(images), 4):
        raise ShapeError(f"images must be (N, C, H, W) with boxes (N, 4), got {tuple(images.shape)} and "
                         f"{tuple(boxes.shape)}")
    hh, ww = images.shape[2:]
    oh, ow = (size, size) if isinstance(size, int) else size
    b = boxes.to(images.device, torch.float32)
    # align_corners=False: pixel edge x maps to 2x/W - 1, so the crop spans the box's edges exactly
    x0, y0, x1, y1 = (2 * b[:, 0] / ww - 1, 2 * b[:, 1] / hh - 1, 2 * b[:, 2] / ww - 1, 2 * b[:, 3] / hh - 1)
    theta = torch.zeros(len(b), 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = (x1 - x0) / 2, (x1 + x0) / 2
    theta[:, 1, 1], theta[:, 1, 2] = (y1 - y0) / 2, (y1 + y0) / 2
    grid = F.affine_grid(theta, [len(b), images.shape[1], oh, ow], align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def embed(z: Tensor, center: Tensor | None = None) -> Tensor:
    """SimpleShot "CL2N": ``(N, D)`` features minus the mean base feature ``center (D,)`` (when given), each row
    L2-normalized."""
    if center is not None:
        z = z - center.to(z.dtype)
    return F.normalize(z, dim=1)


def bag_mask(instance_object: Tensor, query_object: Tensor) -> Tensor:
    """``(N, I)`` bool: instance ``i`` is in the bag of query ``n`` when its object class ``instance_object (I,)``
    equals the query's object class ``query_object (N,)`` (integer codes)."""
    return query_object.reshape(-1, 1) == instance_object.reshape(1, -1)


def bag_predict(scores: Tensor, instance_object: Tensor, query_object: Tensor | None = None) -> Tensor:
    """``(N,)`` instance indices: the arg-max of ``scores (N, I)`` over the instances whose object class equals
    the query's (``query_object (N,)``), or over every instance when ``query_object`` is None. A query whose bag
    is empty is an error."""
    if query_object is None:
        return scores.argmax(dim=1)
    mask = bag_mask(instance_object.to(scores.device), query_object.to(scores.device))
    empty = torch.nonzero(~mask.any(dim=1)).flatten().tolist()
    if empty:
        raise ConfigError(f"queries {empty[:5]} name an object class with no personal instance "
                          f"({sorted(set(query_object[empty].tolist()))[:5]}); add an instance of it first")
    return scores.masked_fill(~mask, float("-inf")).argmax(dim=1)


# ---------------------------------------------------------------------------------------------- the state
class BagConfig(Config):
    """How the bag of instances embeds and searches.

    orders: moment orders of the region statistics (1 mean, 2 std, 3 skewness, ...), used when the recognizer
        encodes images itself (features given to it are taken as they are);
    block_norm: L2-normalize each order's block before concatenating;
    conditioned: search only the instances of the detected object class (the bag); False: every instance;
    center: subtract the mean base feature (SimpleShot), set by :meth:`BagOfInstances.fit_center` before any
        instance is added;
    min_shots: fewest examples an instance may be added with.
    """

    orders: tuple[int, ...] = (1, 2)
    block_norm: bool = True
    conditioned: bool = True
    center: bool = False
    min_shots: int = Field(default=1, ge=1)

    @field_validator("orders")
    @classmethod
    def _orders(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return check_orders(v)


@dataclass(frozen=True)
class BagPrediction:
    """index ``(N,)`` instance indices (into :attr:`BagOfInstances.names`); names and objects per query; source
    of the object classes: ``given`` (the caller's detector), ``predicted`` (nearest object prototype) or
    ``unused`` (``conditioned=False``: every instance searched)."""

    index: Tensor
    names: list[str]
    objects: list[Label | None]
    object_source: Literal["given", "predicted", "unused"]


def _check_label(value: Any, what: str) -> Label:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value):
        raise ConfigError(f"{what} must be a non-empty string or an integer, got {value!r}")
    return value


class BagOfInstances:
    """Personal instances grouped by object class; nearest prototype within the detected class's bag.

    trunk: a module turning images ``(B, C, H, W)`` into feature maps ``(B, C', h, w)`` (e.g. a CNN's conv blocks,
    MobileNetV2's ``features``); None when every method is given features ``(N, D)`` already. transform: applied
    to image batches before the trunk (normalization, resizing); device, batch_size: where and how many at once.

    ::

        bag = BagOfInstances(net.blocks, orders=(1, 2), center=True)
        bag.fit_center(base_images, base_boxes)                    # mean base feature (SimpleShot)
        bag.add_instance("my mug", "mug", shots, boxes)             # a few frames of one instance
        bag.predict(frames, object_class="mug", boxes=boxes).names  # the detector's class and boxes
    """

    def __init__(self, trunk: nn.Module | None = None, config: BagConfig | None = None, *,
                 transform: Callable[[Tensor], Tensor] | None = None, device: torch.device | str = "cpu",
                 batch_size: int = 256, **options: Any) -> None:
        cfg = config or BagConfig()
        self.config = validate(BagConfig, {**cfg.model_dump(), **options}) if options else cfg
        self.trunk, self.transform = trunk, transform
        self.device, self.batch_size = torch.device(device), batch_size
        self.names: list[str] = []
        self.instance_object: list[Label] = []  # object class of each instance
        self.objects: list[Label] = []  # known object classes, in order of first appearance
        self.sums = torch.zeros(0, 0, dtype=torch.float64)  # (I, D) sums of unit embeddings
        self.counts = torch.zeros(0, dtype=torch.int64)  # (I,)
        self.extra_sums = torch.zeros(0, 0, dtype=torch.float64)  # (O, D) object-level examples (add_object_examples)
        self.extra_counts = torch.zeros(0, dtype=torch.int64)  # (O,)
        self.center: Tensor | None = None  # (D,) mean base feature

    # ------------------------------------------------------------------------------------------- features
    @property
    def dim(self) -> int | None:
        """Feature dimension D, fixed by the first features the recognizer takes (center or instance)."""
        if self.center is not None:
            return int(self.center.shape[0])
        return int(self.sums.shape[1]) if self.names else None

    @torch.no_grad()
    def encode(self, images: Tensor, boxes: Tensor | None = None) -> Tensor:
        """Region features ``(N, len(orders) * C)`` of images ``(N, C, H, W)`` through the trunk, pooled over each
        box ``(N, 4)`` (pixels) or over the whole map."""
        if self.trunk is None:
            raise ConfigError("this recognizer has no trunk to encode images: give features (N, D), or build it "
                              "as BagOfInstances(trunk)")
        if images.ndim != 4:
            raise ShapeError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        if boxes is not None and tuple(boxes.shape) != (len(images), 4):
            raise ShapeError(f"boxes must be (N, 4) with N = {len(images)} images, got {tuple(boxes.shape)}")
        was = self.trunk.training
        self.trunk.eval()
        out = []
        try:
            for i in range(0, len(images), self.batch_size):
                x = images[i:i + self.batch_size].to(self.device)
                if self.transform is not None:
                    x = self.transform(x)
                fmap = self.trunk(x)
                b = None if boxes is None else boxes[i:i + self.batch_size]
                out.append(region_moments(fmap, b, tuple(images.shape[2:]), self.config.orders,
                                          block_norm=self.config.block_norm).float().cpu())
        finally:
            self.trunk.train(was)
        return torch.cat(out)

    def features(self, x: Tensor, boxes: Tensor | None = None) -> Tensor:
        """``(N, D)``: ``x`` itself when it is features ``(N, D)``, else :meth:`encode` of images ``(N, C, H, W)``."""
        if not isinstance(x, Tensor):
            raise ConfigError(f"examples must be a tensor of features (N, D) or images (N, C, H, W), got "
                              f"{type(x).__name__}")
        if len(x) == 0:
            raise ConfigError("the example set is empty: give at least one example")
        if x.ndim == 2:
            if boxes is not None:
                raise ConfigError("boxes locate regions of images; these examples are features (N, D) already")
            z = x.float().cpu()
        elif x.ndim == 4:
            z = self.encode(x, boxes)
        else:
            raise ShapeError(f"examples must be features (N, D) or images (N, C, H, W), got {tuple(x.shape)}")
        if self.dim is not None and z.shape[1] != self.dim:
            raise ShapeError(f"features have dimension {z.shape[1]} but the recognizer's have {self.dim}: the "
                             "trunk or the moment orders differ from the ones its instances were added with")
        return z

    def fit_center(self, base: Tensor, boxes: Tensor | None = None) -> Tensor:
        """Set the SimpleShot centre to the mean feature ``(D,)`` of base examples (not personal instances: e.g.
        the backbone's training data); only before the first instance (it changes every embedding)."""
        if not self.config.center:
            raise ConfigError("fit_center needs center=True (BagOfInstances(..., center=True))")
        if self.names:
            raise ConfigError(f"fit_center after {len(self.names)} instances were added would change their "
                              "prototypes; set the centre first (or build a new recognizer)")
        self.center = self.features(base, boxes).double().mean(dim=0)
        return self.center

    def _embed(self, z: Tensor) -> Tensor:
        if self.config.center and self.center is None:
            raise ConfigError("center=True but no centre is set: call fit_center(base_examples) first")
        return embed(z.double(), self.center)

    # ------------------------------------------------------------------------------------------- learning
    def _object_code(self, object_class: Any, *, known_only: bool) -> int:
        label = _check_label(object_class, "object_class")
        if label in self.objects:
            return self.objects.index(label)
        if known_only:
            raise ConfigError(f"object class {label!r} has no personal instance.{did_you_mean(str(label), map(str, self.objects))} "
                              f"Known object classes: {self.objects[:20]}; add an instance of it first")
        return len(self.objects)

    def add_instance(self, name: str, object_class: Label, examples: Tensor, boxes: Tensor | None = None) -> int:
        """Add personal instance ``name`` of ``object_class`` from its examples (features ``(N, D)`` or images
        ``(N, C, H, W)`` with optional boxes ``(N, 4)``); returns its index. A name already used is refused."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"an instance name must be a non-empty string, got {name!r}")
        if name in self.names:
            raise ConfigError(f"instance {name!r} is already known (object class "
                              f"{self.instance_object[self.names.index(name)]!r}); give the new instance another "
                              "name")
        code = self._object_code(object_class, known_only=False)
        z = self.features(examples, boxes)
        if len(z) < self.config.min_shots:
            raise ConfigError(f"min_shots={self.config.min_shots} but instance {name!r} has {len(z)} example(s)")
        e = self._embed(z)
        s, n = class_sums(e, torch.zeros(len(e), dtype=torch.int64), [0], normalize_first=False)
        # every check passed: change the state
        if not self.names:
            self.sums, self.extra_sums = torch.zeros(0, e.shape[1], dtype=torch.float64), torch.zeros(
                0, e.shape[1], dtype=torch.float64)
        if code == len(self.objects):
            self.objects.append(object_class)
            self.extra_sums = torch.cat([self.extra_sums, torch.zeros(1, e.shape[1], dtype=torch.float64)])
            self.extra_counts = torch.cat([self.extra_counts, torch.zeros(1, dtype=torch.int64)])
        self.names.append(name)
        self.instance_object.append(object_class)
        self.sums, self.counts = torch.cat([self.sums, s]), torch.cat([self.counts, n])
        log.debug("instance %r of %r from %d examples (%d instances, %d object classes)", name, object_class,
                  len(z), len(self.names), len(self.objects))
        return len(self.names) - 1

    def add_object_examples(self, object_class: Label, examples: Tensor, boxes: Tensor | None = None) -> None:
        """More object-level examples of a known object class (any of its instances or none) for the object
        classifier used when :meth:`predict` is not given the object class."""
        code = self._object_code(object_class, known_only=True)
        e = self._embed(self.features(examples, boxes))
        self.extra_sums = self.extra_sums.clone()
        self.extra_sums[code] += e.sum(dim=0)
        self.extra_counts = self.extra_counts.clone()
        self.extra_counts[code] += len(e)

    # ----------------------------------------------------------------------------------------- prediction
    def _codes(self) -> Tensor:
        return torch.tensor([self.objects.index(o) for o in self.instance_object], dtype=torch.int64)

    def instance_prototypes(self) -> Tensor:
        """``(I, D)`` unit prototypes in :attr:`names` order."""
        self._need_instances()
        return prototypes_from_sums(self.sums, self.counts)

    def object_prototypes(self) -> Tensor:
        """``(O, D)`` unit object prototypes (all shots of the object's instances and its object-level examples)
        in :attr:`objects` order."""
        self._need_instances()
        codes = self._codes()
        sums = self.extra_sums.clone().index_add_(0, codes, self.sums)
        counts = self.extra_counts.clone().index_add_(0, codes, self.counts)
        return prototypes_from_sums(sums, counts)

    def _need_instances(self) -> None:
        if not self.names:
            raise ConfigError("the recognizer has no instances yet: call add_instance(name, object_class, examples)")

    def object_codes(self, z: Tensor, object_class: Label | Sequence[Label] | None) -> tuple[Tensor, str]:
        """Object class codes ``(N,)`` of features ``(N, D)``: the caller's (one label for all or one per query,
        each known) or the nearest object prototype's; and ``"given"`` or ``"predicted"``."""
        if object_class is None:
            return cosine_scores(self._embed(z), self.object_prototypes()).argmax(dim=1), "predicted"
        labels = [object_class] * len(z) if isinstance(object_class, (str, int)) else list(object_class)
        if len(labels) != len(z):
            raise ShapeError(f"{len(labels)} object classes for {len(z)} queries: give one for all or one each")
        return torch.tensor([self._object_code(o, known_only=True) for o in labels], dtype=torch.int64), "given"

    def scores(self, x: Tensor, boxes: Tensor | None = None) -> Tensor:
        """``(N, I)`` cosine of each query (features or images with boxes) to every instance prototype."""
        self._need_instances()
        return cosine_scores(self._embed(self.features(x, boxes)), self.instance_prototypes())

    def predict(self, x: Tensor, object_class: Label | Sequence[Label] | None = None, boxes: Tensor | None = None,
                *, conditioned: bool | None = None) -> BagPrediction:
        """The personal instance of each query ``x`` (features ``(N, D)`` or images ``(N, C, H, W)`` with boxes).

        object_class: the detector's class, one label for every query or one per query; None: predicted by the
        nearest object prototype. conditioned: override the config (False: search every instance)."""
        self._need_instances()
        z = self.features(x, boxes)
        scores = cosine_scores(self._embed(z), self.instance_prototypes())
        cond = self.config.conditioned if conditioned is None else conditioned
        if cond:
            codes, source = self.object_codes(z, object_class)
            index = bag_predict(scores, self._codes(), codes)
        else:
            if object_class is not None:
                self.object_codes(z, object_class)  # still refuse unknown classes: a typo should not pass silently
            index, source, codes = bag_predict(scores, self._codes()), "unused", None
        log.debug("predicted %d queries (object classes %s)", len(z), source)
        objects = [None] * len(z) if codes is None else [self.objects[c] for c in codes.tolist()]
        return BagPrediction(index, [self.names[i] for i in index.tolist()], objects, source)  # type: ignore[arg-type]

    # ---------------------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write the prototypes (as sums and counts), the centre, the names, object classes and config to one
        safetensors file (the trunk is not saved: it is the user's model)."""
        self._need_instances()
        tensors = {"sums": self.sums, "counts": self.counts, "extra_sums": self.extra_sums,
                   "extra_counts": self.extra_counts}
        if self.center is not None:
            tensors["center"] = self.center
        meta = {"config": json.dumps(self.config.to_dict()), "names": json.dumps(self.names),
                "instance_object": json.dumps(self.instance_object), "objects": json.dumps(self.objects)}
        return write_tagged(path, tensors, meta, FORMAT, VERSION)

    @classmethod
    def load(cls, path: str | Path, trunk: nn.Module | None = None, **kwargs: Any) -> BagOfInstances:
        """A recognizer from :meth:`save`'s file; ``trunk`` and ``kwargs`` (transform, device, batch_size) as in
        the constructor."""
        tensors, meta = read_tagged(path, FORMAT, VERSION, "bag-of-instances")
        bag = cls(trunk, validate(BagConfig, json.loads(meta["config"])), **kwargs)
        bag.names = json.loads(meta["names"])
        bag.instance_object = json.loads(meta["instance_object"])
        bag.objects = json.loads(meta["objects"])
        bag.sums, bag.counts = tensors["sums"], tensors["counts"]
        bag.extra_sums, bag.extra_counts = tensors["extra_sums"], tensors["extra_counts"]
        bag.center = tensors.get("center")
        return bag
