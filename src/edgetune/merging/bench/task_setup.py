"""The tasks, backbones and fine-tunes of the ``merging-tasks`` suite (see :mod:`edgetune.merging.bench.tasks`).

Tasks, all grey ``(1, 28, 28)`` images in [0, 1] from offline data, chosen to differ in input statistics and
labels so that the fine-tunes pull the shared backbone in different directions and merging is not trivial:

- base (and must-keep) task ``glyphs-base``: SynGlyph classes 0-59 (generated strokes, 28 px);
- ``glyphs-new``: SynGlyph classes 60-79, glyphs the base never saw (20-way, fine-grained shapes);
- ``fmnist-tops``: Fashion-MNIST T-shirt, pullover, dress, coat, shirt (5-way, the hard, similar classes);
- ``fmnist-rest``: Fashion-MNIST trouser, sandal, sneaker, bag, ankle boot (5-way);
- ``digits``: scikit-learn's 8x8 digits upsampled (bilinear) to 28x28 (10-way, blurry strokes);
- ``digits-inverted``: the same digits with inverted intensity (``1 - x``: dark strokes on white), same labels but
  opposite input statistics, which conflicts with ``digits`` in the shared weights.

Fine-tuning (LP-FT, Kumar et al. 2022): each task's head starts as a linear probe of the frozen base backbone fitted
on a few examples per class (``shots``), then the whole model (backbone and head) is fine-tuned on the task with SGD.
Each task keeps its own fine-tuned head, as in merging with task-specific heads (RegMean, Jin et al. 2023; Fisher
merging, Matena & Raffel 2022); only the backbone is merged. The suite's ``heads`` option changes the protocol:
``frozen`` keeps the few-shot probe head fixed while the backbone is fine-tuned; ``cosine`` is the CLIP-like
protocol of task arithmetic and AdaMerging: a fixed cosine head on the base features' few-shot class means (as
CLIP's zero-shot head on text embeddings, logit scale ``cosine_scale``), the backbone fine-tuned under it. Batch-norm statistics stay the base's (BN layers are in
eval mode while fine-tuning), so every model holds the same ones. A linear probe on all of a task's training data
(:func:`linear_probe` without ``shots``) is the reference for what the base backbone can do with a trained head.

The MLP backbone (784-512-512, the default) is pretrained here with Adam on the base task. ``mobilenet-v2`` (the
ImageNet MobileNetV2) is refused with a ConfigError giving the measured reason: see :func:`check_backbone`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetune.core.errors import ConfigError
from edgetune.data import DataConfig, load_dataset
from edgetune.models import MLP

__all__ = ["FULL", "QUICK", "TASKS", "Backbone", "Sizes", "Task", "accuracy", "backbone_of", "build_backbone", "build_tasks",
           "check_backbone", "fine_tune", "linear_probe"]

log = logging.getLogger(__name__)

XY = tuple[Tensor, Tensor]
FMNIST_GROUPS = {"fmnist-tops": (0, 2, 3, 4, 6), "fmnist-rest": (1, 5, 7, 8, 9)}
GLYPHS_BASE, GLYPHS_NEW = range(60), range(60, 80)
SIDE = 28
TASKS = ("glyphs-new", "fmnist-tops", "fmnist-rest", "digits", "digits-inverted")  # what build_tasks returns


@dataclass(frozen=True)
class Sizes:
    """How big a run is: examples per task split, steps and learning rates of each training phase."""

    glyphs_train: int  # SynGlyph images per class (train, before the validation hold-out)
    glyphs_test: int
    n_train: int  # at most this many training examples per task (Fashion-MNIST groups, digits)
    n_val: int  # validation examples per task (held out of the training split; picks merge hyper-parameters)
    n_test: int
    widths: tuple[int, ...]  # hidden widths of the MLP backbone
    pretrain_steps: int  # Adam, on the base task
    ft_steps: int  # SGD with momentum 0.9, the whole model
    shots: int = 5  # examples per class of the linear probe a task's head starts from
    probe_steps: int = 200
    batch: int = 128
    pretrain_lr: float = 1e-3
    probe_lr: float = 1e-2
    ft_lr: float = 3e-3
    cosine_scale: float = 32.0  # heads=cosine: the logit scale of the frozen prototype heads
    cosine_ft_lr: float = 1e-2  # heads=cosine: SGD lr of the fine-tunes (bounded logits need larger steps)


QUICK = Sizes(glyphs_train=25, glyphs_test=10, n_train=800, n_val=150, n_test=400, widths=(512, 512),
              pretrain_steps=250, ft_steps=150, probe_steps=100)
FULL = Sizes(glyphs_train=250, glyphs_test=60, n_train=5000, n_val=800, n_test=3000, widths=(512, 512),
             pretrain_steps=3000, ft_steps=300)


@dataclass
class Task:
    """One classification task: float images ``(N, 1, 28, 28)`` in [0, 1] and labels ``(N,)`` per split."""

    name: str
    num_classes: int
    train: XY
    val: XY
    test: XY


# --------------------------------------------------------------------------------------------------- data
def _floats(bundle: Any, split: Any) -> XY:
    x, y = split.tensors
    if bundle.transform is not None:
        x = bundle.transform([x, y])[0]
    return x.float(), y.long()


def _classes(xy: XY, classes: Any, limit: int | None, g: torch.Generator) -> XY:
    """The examples of ``classes`` (relabelled 0..k-1 in that order), a seeded random ``limit`` of them."""
    x, y = xy
    lut = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(list(classes))] = torch.arange(len(classes))
    keep = torch.nonzero(lut[y] >= 0).flatten()
    keep = keep[torch.randperm(len(keep), generator=g)][:limit].sort().values
    return x[keep], lut[y[keep]]


def _task(name: str, k: int, train: XY, test: XY, n_val: int, g: torch.Generator) -> Task:
    perm = torch.randperm(len(train[1]), generator=g)
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    return Task(name, k, (train[0][train_idx], train[1][train_idx]), (train[0][val_idx], train[1][val_idx]), test)


def build_tasks(sizes: Sizes, seed: int) -> tuple[Task, list[Task]]:
    """The base (must-keep) task and the fine-tuning tasks, all drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    glyphs = load_dataset(DataConfig(name="synglyph", seed=seed, options={
        "num_classes": len(GLYPHS_BASE) + len(GLYPHS_NEW), "size": SIDE, "train_per_class": sizes.glyphs_train,
        "test_per_class": sizes.glyphs_test}))
    g_train, g_test = _floats(glyphs, glyphs.train), _floats(glyphs, glyphs.test)
    val_frac = sizes.n_val / (sizes.n_val + sizes.n_train)
    tasks = []
    for name, cls in (("glyphs-base", GLYPHS_BASE), ("glyphs-new", GLYPHS_NEW)):
        train = _classes(g_train, cls, None, g)
        tasks.append(_task(name, len(cls), train, _classes(g_test, cls, None, g), round(val_frac * len(train[1])), g))
    fm = load_dataset(DataConfig(name="fashion-mnist"))
    fm_train, fm_test = _floats(fm, fm.train), _floats(fm, fm.test)
    for name, cls in FMNIST_GROUPS.items():
        tasks.append(_task(name, len(cls), _classes(fm_train, cls, sizes.n_train + sizes.n_val, g),
                           _classes(fm_test, cls, sizes.n_test, g), sizes.n_val, g))
    dg = load_dataset(DataConfig(name="digits", seed=seed, options={"test_fraction": 0.3}))
    up = [(F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False).clamp_(0, 1), y)
          for x, y in (_floats(dg, dg.train), _floats(dg, dg.test))]
    n_val = min(sizes.n_val, len(up[0][1]) // 5)
    digits = _task("digits", 10, up[0], up[1], n_val, g)
    tasks.append(digits)
    tasks.append(Task("digits-inverted", 10, *[(1 - x, y) for x, y in (digits.train, digits.val, digits.test)]))
    for t in tasks:
        log.info("task %s: %d classes, %d / %d / %d train / val / test", t.name, t.num_classes, len(t.train[1]),
                 len(t.val[1]), len(t.test[1]))
    return tasks[0], tasks[1:]


# ------------------------------------------------------------------------------------------------ backbones
@dataclass
class Backbone:
    """A base model (with the base task's head) and how to feed it.

    head: the name of its classification head module (a Linear, or a :class:`CosineHead`); every other tensor is the
    backbone merged.
    features: ``(model, x) -> (B, D)`` the pooled features the head reads. prep: float images ``(B, 1, 28, 28)``
    to the model's input. info: what to report about it.
    """

    name: str
    model: nn.Module
    head: str
    features: Callable[[nn.Module, Tensor], Tensor]
    prep: Callable[[Tensor], Tensor] = lambda x: x
    info: dict[str, Any] = field(default_factory=dict)

    def with_head(self, head: nn.Module) -> nn.Module:
        """A copy of the base model with ``head`` (copied) as its classification head."""
        model = copy.deepcopy(self.model)
        model.set_submodule(self.head, copy.deepcopy(head))
        return model

    def head_of(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.head)


def backbone_of(state: dict[str, Tensor], head: str) -> dict[str, Tensor]:
    """The state dict without the head's tensors (what is merged)."""
    return {k: v for k, v in state.items() if not k.startswith(head + ".")}


def _batches(n: int, batch: int, steps: int, seed: int) -> Iterator[Tensor]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, n, (min(batch, n),), generator=g)


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _train(model: nn.Module, params: list[nn.Parameter], data: XY, prep: Callable[[Tensor], Tensor], steps: int,
           lr: float, batch: int, seed: int, freeze_bn: bool, optimizer: str = "adam") -> None:
    """Adam (or SGD with momentum 0.9) on the cross-entropy of ``model`` over ``data`` (random batches), only
    ``params`` updated."""
    x, y = data
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    if freeze_bn:
        _freeze_bn(model)
    for idx in _batches(len(y), batch, steps, seed):
        idx = idx.to(x.device)
        loss = F.cross_entropy(model(prep(x[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: XY, prep: Callable[[Tensor], Tensor], batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``data``."""
    model.eval()
    x, y = data
    hits = sum(int((model(prep(x[i:i + batch])).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return hits / len(y)


def linear_probe(bb: Backbone, data: XY, num_classes: int, sizes: Sizes, seed: int,
                 shots: int | None = None) -> nn.Linear:
    """A head trained (Adam, cross-entropy) on the frozen base backbone's features of ``data``, or of ``shots``
    seeded random examples per class of it."""
    x, y = data
    if shots is not None:
        g = torch.Generator().manual_seed(seed)
        pick = [torch.nonzero(y == c).flatten() for c in range(num_classes)]
        idx = torch.cat([p[torch.randperm(len(p), generator=g)[:shots]] for p in pick])
        x, y = x[idx.to(x.device)], y[idx.to(y.device)]
    with torch.no_grad():
        bb.model.eval()
        feats = torch.cat([bb.features(bb.model, bb.prep(x[i:i + 1000])) for i in range(0, len(y), 1000)])
    torch.manual_seed(seed)
    head = nn.Linear(feats.shape[1], num_classes, device=feats.device)
    _train(head, list(head.parameters()), (feats, y), lambda f: f, sizes.probe_steps, sizes.probe_lr, 256, seed,
           freeze_bn=False)
    return head


class CosineHead(nn.Module):
    """A fixed cosine classifier, as CLIP's zero-shot head: ``scale * normalize(f) @ normalize(prototypes)^T``.

    ``prototypes`` ``(C, D)`` are a buffer (no parameter: fine-tuning never changes them).
    """

    def __init__(self, prototypes: Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("weight", F.normalize(prototypes.detach(), dim=1))
        self.scale = float(scale)
        self.in_features, self.out_features = prototypes.shape[1], prototypes.shape[0]

    def forward(self, features: Tensor) -> Tensor:
        return self.scale * F.normalize(features, dim=1) @ self.weight.t()


def prototype_head(bb: Backbone, data: XY, num_classes: int, sizes: Sizes, seed: int) -> CosineHead:
    """A :class:`CosineHead` on the class means of the frozen base backbone's features of ``sizes.shots`` seeded
    random examples per class of ``data``."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([p[torch.randperm(len(p), generator=g)[:sizes.shots]]
                     for p in (torch.nonzero(y == c).flatten() for c in range(num_classes))])
    with torch.no_grad():
        bb.model.eval()
        x_s, y_s = x[idx.to(x.device)], y[idx.to(y.device)]
        feats = bb.features(bb.model, bb.prep(x_s))
    protos = torch.stack([feats[y_s == c].mean(0) for c in range(num_classes)])
    return CosineHead(protos, sizes.cosine_scale)


def fine_tune(bb: Backbone, head: nn.Module, data: XY, sizes: Sizes, seed: int, tune_head: bool = True,
              lr: float | None = None) -> nn.Module:
    """The base model with ``head``, fine-tuned on ``data`` (``tune_head=False``: the head frozen; ``lr``: instead
    of ``sizes.ft_lr``)."""
    model = bb.with_head(head)
    params = [p for n, p in model.named_parameters() if tune_head or not n.startswith(bb.head + ".")]
    if not tune_head:
        for p in bb.head_of(model).parameters():
            p.requires_grad_(False)
    _train(model, params, data, bb.prep, sizes.ft_steps, sizes.ft_lr if lr is None else lr, sizes.batch, seed,
           freeze_bn=True, optimizer="sgd")
    return model


def check_backbone(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a backbone this suite builds (``mlp``)."""
    if name == "mobilenet-v2":
        raise ConfigError(
            "merging-tasks: backbone=mobilenet-v2 is refused. Measured (ImageNet MobileNetV2, 28 px images resized to 32 "
            "px, ImageNet normalisation, BN frozen, quick sizes, 100 steps of batch 64): this suite's SGD recipe "
            "(momentum 0.9, lr 3e-3, tuned for the MLP) diverges, training accuracy included, to chance (glyphs-new 0.05, "
            "fmnist-tops 0.20, from few-shot probes at 0.32 / 0.52), lr 3e-2 too; Adam lr 1e-4 fine-tunes it (glyphs-new "
            "0.80 vs 0.47 for a full linear probe). But one step takes 0.24 s on one core, so the six fine-tunes alone "
            "(300 steps of batch 128) need ~14 min before any merge, over the suite's ~15 min budget on one core. "
            "Use backbone=mlp (the default)")
    if name != "mlp":
        raise ConfigError(f"merging-tasks: unknown backbone {name!r}; use backbone=mlp")


def build_backbone(name: str, base: Task, sizes: Sizes, seed: int, device: torch.device) -> Backbone:
    """``mlp``: an edgetune MLP pretrained here (Adam) on the base task, whose head is the must-keep head (the only
    backbone so far: :func:`check_backbone`)."""
    check_backbone(name)
    torch.manual_seed(seed)
    model = MLP(SIDE * SIDE, base.num_classes, widths=sizes.widths, device=device)
    _train(model, list(model.parameters()), base.train, lambda x: x, sizes.pretrain_steps, sizes.pretrain_lr,
           sizes.batch, seed, freeze_bn=False)
    return Backbone("mlp", model, "head", lambda m, x: m.features(x),
                    info={"backbone_params": sum(p.numel() for p in model.parameters()),
                          "widths": "-".join(str(w) for w in (SIDE * SIDE, *sizes.widths))})
