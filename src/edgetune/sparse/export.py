"""Export a trained sparse model as a compact, self-describing folder, with dead neurons physically removed.

Dynamic sparse training (CHT/CHTs percolation in particular) leaves hidden neurons that cannot carry
signal: no incoming links, or no outgoing links. :func:`compact_mlp_` removes them from an MLP and
shrinks its layers, keeping the eval-mode outputs unchanged: a neuron with no inputs still outputs the
constant ``act(norm(b_j))``, which is folded into the next layer's bias before the neuron goes; a neuron
with no outputs is simply dropped. Removals can starve other neurons, so this repeats to a fixed point.

Each layer is then stored in the cheaper of two forms (:class:`StorageRule`): ``SparseLinear`` (int32
``indices`` + ``values``) or a dense ``nn.Linear``. An export folder holds ``model.safetensors`` and
``manifest.json`` (architecture, per-layer storage, SHA-256 of the tensor file); :func:`load_exported`
rebuilds the model from that folder alone. MLPs are rebuilt from the manifest's layer list; other models
(exported without neuron removal) are rebuilt from the model registry (``builder`` in the manifest:
model name, options, input shape, classes) with their sparse layers put back, which works as long as
sparse layers are the only change a recipe made to the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetune.core.errors import CheckpointError, ConfigError
from edgetune.core.state import atomic_write_json, load_tensors, save_tensors, sha256_file
from edgetune.core.surgery import replace_module
from edgetune.sparse.layer import SparseLinear

__all__ = ["FORMAT", "VERSION", "CompactionReport", "StorageRule", "apply_storage_rule_", "choose_storage",
           "compact_mlp_", "export_run", "load_exported", "save_exported"]

log = logging.getLogger(__name__)

FORMAT, VERSION = "edgetune-export", 1
MANIFEST, TENSORS = "manifest.json", "model.safetensors"
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}
_ACT_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh"}


# ---------------------------------------------------------------- storage rule
@dataclass(frozen=True)
class StorageRule:
    """Which storage a layer gets: dense ``nn.Linear`` when any of these holds, else ``SparseLinear``.

    1. bytes: ``nnz * (value + 2 * index bytes) >= out * in * value bytes`` (sparse is not smaller;
       with float32 values and int32 indices that is density >= 1/3), or ``nnz == 0``;
    2. latency: density > ``max_sparse_density``. Measured on CPU (1 thread, torch 2.13 + MKL, AMD EPYC
       Zen 4), inference forward of CSR ``SparseLinear`` vs ``nn.Linear``: at batch 1 the crossover lies
       at ~6% (784->1568) to ~9% (1568->1568); at batch 256 at 10-20%. 0.06 keeps batch 1 no slower;
    3. tiny layers, off by default: ``out * in <= min_sparse_elements``. The sparse kernel costs a
       fixed ~30 us per call, more than a whole small dense product (a 1568->10 layer: 7 us dense vs
       36 us sparse at any density); ``min_sparse_elements=16384`` trades up to 64 KiB per layer for that.

    ``StorageRule(max_sparse_density=1.0)`` minimizes bytes only.
    """

    max_sparse_density: float = 0.06
    min_sparse_elements: int = 0

    def choose(self, out_features: int, in_features: int, nnz: int, value_bytes: int = 4,
               index_bytes: int = 4) -> str:
        """``"sparse"`` or ``"dense"`` for an ``(out, in)`` weight with ``nnz`` links."""
        dense = out_features * in_features
        if nnz == 0 or nnz * (value_bytes + 2 * index_bytes) >= dense * value_bytes:
            return "dense"
        if nnz / dense > self.max_sparse_density or dense <= self.min_sparse_elements:
            return "dense"
        return "sparse"


def choose_storage(out_features: int, in_features: int, nnz: int, dtype: torch.dtype = torch.float32,
                   rule: StorageRule | None = None) -> str:
    """:meth:`StorageRule.choose` with the value size of ``dtype`` and int32 indices."""
    value_bytes = torch.empty((), dtype=dtype).element_size()
    return (rule or StorageRule()).choose(out_features, in_features, nnz, value_bytes, 4)


# ---------------------------------------------------------------- layers as link lists
@dataclass
class _Links:
    """One ``(out, in)`` weight as links ``rows``/``cols``/``vals`` ``(nnz,)`` plus a bias ``(out,)``."""

    out_f: int
    in_f: int
    rows: Tensor
    cols: Tensor
    vals: Tensor
    bias: Tensor | None

    @classmethod
    def of(cls, layer: nn.Module) -> _Links:
        if isinstance(layer, SparseLinear):
            rows, cols = layer.indices.long()
            vals = layer.values.detach()
        else:
            w = layer.weight.detach()
            rows, cols = (w != 0).nonzero().t()
            vals = w[rows, cols]
        live = vals != 0  # a zero-valued link carries nothing: drop it (NaN stays)
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        return cls(layer.out_features, layer.in_features, rows[live], cols[live], vals[live].clone(), bias)

    def keep(self, sel: Tensor) -> None:
        self.rows, self.cols, self.vals = self.rows[sel], self.cols[sel], self.vals[sel]

    def has_in(self) -> Tensor:
        """Bool ``(out,)``: output neurons with at least one link."""
        return torch.bincount(self.rows, minlength=self.out_f) > 0

    def has_out(self) -> Tensor:
        """Bool ``(in,)``: input neurons with at least one link."""
        return torch.bincount(self.cols, minlength=self.in_f) > 0

    def build(self, rule: StorageRule, training: bool, kind: str | None = None) -> nn.Module:
        dt, dev = self.vals.dtype, self.vals.device
        kind = kind or choose_storage(self.out_f, self.in_f, self.vals.numel(), dt, rule)
        if kind == "sparse":
            links = torch.stack([self.rows, self.cols])  # (2, nnz)
            layer: nn.Module = SparseLinear(self.in_f, self.out_f, links, self.vals,
                                            bias=self.bias is not None, device=dev, dtype=dt)
        else:
            layer = nn.utils.skip_init(nn.Linear, self.in_f, self.out_f, bias=self.bias is not None,
                                       device=dev, dtype=dt)
            with torch.no_grad():
                layer.weight.zero_()[self.rows, self.cols] = self.vals
        if self.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(self.bias)
        return layer.train(training)


# ---------------------------------------------------------------- MLP compaction
@dataclass(frozen=True)
class CompactionReport:
    """What :func:`compact_mlp_` did. Per hidden layer: widths, neurons removed for having no inputs
    (``folded``: their constant output went into the next bias) or no outputs (``cut``). Per layer
    (hidden layers then head): links before/after and the storage chosen."""

    widths_before: tuple[int, ...]
    widths_after: tuple[int, ...]
    folded: tuple[int, ...]
    cut: tuple[int, ...]
    links_before: tuple[int, ...]
    links_after: tuple[int, ...]
    storage: tuple[str, ...]
    sweeps: int

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _activation_name(model: nn.Module) -> str:
    act = getattr(model, "act", None)
    for name, fn in _ACTIVATIONS.items():
        if act is fn:
            return name
    if type(act) in _ACT_MODULES:
        return _ACT_MODULES[type(act)]
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ConfigError(f"cannot compact or export an MLP with activation {act!r}: only relu, gelu and tanh "
                      "are supported; build the MLP with activation='relu', 'gelu' or 'tanh'")


def _mlp_parts(model: nn.Module) -> tuple[list[nn.Module], list[nn.BatchNorm1d] | None, str]:
    """The chain ``layers.0 .. layers.{L-1}, head``, the norms and the activation; raise if not an MLP."""
    layers, head = getattr(model, "layers", None), getattr(model, "head", None)
    if not isinstance(layers, nn.ModuleList) or head is None:
        raise ConfigError(f"{type(model).__name__} is not an MLP (needs a `layers` ModuleList and a `head`); "
                          "neuron compaction supports edgetune's MLP only: export other models without it")
    chain = [*layers, head]
    names = [*(f"layers.{i}" for i in range(len(layers))), "head"]
    for name, layer in zip(names, chain, strict=True):
        if not isinstance(layer, (nn.Linear, SparseLinear)):
            raise ConfigError(f"MLP layer {name!r} is a {type(layer).__name__}, not nn.Linear or "
                              "SparseLinear; merge or remove adapters/wrappers before compacting")
    for a, b, nb in zip(chain, chain[1:], names[1:], strict=False):
        if a.out_features != b.in_features:
            raise ConfigError(f"MLP layer {nb!r} takes {b.in_features} inputs but the layer before gives "
                              f"{a.out_features}; the model is not a chain")
    norms = getattr(model, "norms", None)
    if norms is not None:
        if len(norms) != len(layers) or not all(isinstance(n, nn.BatchNorm1d) and n.running_mean is not None
                                                for n in norms):
            raise ConfigError("MLP norms must be one BatchNorm1d with running statistics per hidden layer "
                              "(track_running_stats=True); compaction is exact only with fixed statistics")
        norms = list(norms)
    return chain, norms, _activation_name(model)


def _constant_outputs(bias: Tensor | None, n: int, like: Tensor, norm: nn.BatchNorm1d | None,
                      act: str) -> Tensor:
    """``act(norm(b))`` ``(n,)``: what each hidden neuron outputs when it gets no input (eval mode)."""
    z = (bias if bias is not None else like.new_zeros(n)).unsqueeze(0)  # (1, n)
    if norm is not None:
        z = F.batch_norm(z, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
    return _ACTIVATIONS[act](z)[0]


def _shrink_norm(norm: nn.BatchNorm1d, keep: Tensor) -> nn.BatchNorm1d:
    new = nn.BatchNorm1d(int(keep.sum()), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                         device=norm.running_mean.device, dtype=norm.running_mean.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(norm, name)
            if src is not None:
                getattr(new, name).copy_(src[keep])
        new.num_batches_tracked.copy_(norm.num_batches_tracked)
    return new.train(norm.training)


def compact_mlp_(model: nn.Module, *, rule: StorageRule | None = None) -> CompactionReport:
    """Remove dead hidden neurons of an MLP in place and store each layer as :class:`StorageRule` says.

    A hidden neuron is dead when it has no incoming links (its output is the constant
    ``act(norm(b_j))``, or ``act(beta_j)`` when its BatchNorm scale is 0: folded into the next layer's
    bias, ``bias' += W_next[:, j] * c_j``) or no outgoing links (dropped). Zero-valued links count as
    absent. Repeats to a fixed point; a hidden layer keeps at least one (link-less) neuron. Eval-mode
    outputs ``(B, C)`` are unchanged up to float rounding (training mode differs: dropout, batch stats).
    """
    chain, norms, act = _mlp_parts(model)
    links = [_Links.of(layer) for layer in chain]
    n_hidden = len(chain) - 1
    widths_before = tuple(lk.out_f for lk in links[:-1])
    links_before = tuple(m.nnz() if isinstance(m, SparseLinear) else int((m.weight != 0).sum())
                         for m in chain)
    keep = [torch.ones(w, dtype=torch.bool, device=lk.vals.device) for w, lk in zip(widths_before, links)]
    pinned = [torch.zeros_like(k) for k in keep]
    folded, cut, sweeps, changed = [0] * n_hidden, [0] * n_hidden, 0, True
    while changed:
        changed, sweeps = False, sweeps + 1
        for h in range(n_hidden):
            src, dst, norm = links[h], links[h + 1], norms[h] if norms else None
            const = ~src.has_in()
            if norm is not None and norm.weight is not None:
                const |= norm.weight.detach() == 0
            has_out = dst.has_out()
            dead = keep[h] & ~pinned[h] & (const | ~has_out)
            if not bool(dead.any()):
                continue
            changed = True
            fold = dead & const & has_out
            if bool(fold.any()):
                c = _constant_outputs(src.bias, src.out_f, src.vals, norm, act)  # (n_h,)
                sel = fold[dst.cols]
                add = torch.zeros(dst.out_f, dtype=dst.vals.dtype, device=dst.vals.device)
                add.index_add_(0, dst.rows[sel], dst.vals[sel] * c[dst.cols[sel]])
                dst.bias = add if dst.bias is None else dst.bias + add
            src.keep(~dead[src.rows])
            dst.keep(~dead[dst.cols])
            folded[h] += int(fold.sum())
            cut[h] += int((dead & ~fold).sum())
            keep[h] &= ~dead
            if not bool(keep[h].any()):  # keep one link-less neuron: no zero-width layers
                j = int(dead.nonzero()[0])
                keep[h][j] = pinned[h][j] = True
    for h in range(len(links)):  # renumber the surviving neurons
        lk = links[h]
        if h < n_hidden:
            lk.rows = (torch.cumsum(keep[h], 0) - 1)[lk.rows]
            lk.out_f = int(keep[h].sum())
            lk.bias = lk.bias[keep[h]] if lk.bias is not None else None
        if h > 0:
            lk.cols = (torch.cumsum(keep[h - 1], 0) - 1)[lk.cols]
            lk.in_f = int(keep[h - 1].sum())
    rule = rule or StorageRule()
    storage = []
    for h, lk in enumerate(links):
        new = lk.build(rule, chain[h].training)
        storage.append("sparse" if isinstance(new, SparseLinear) else "dense")
        replace_module(model, f"layers.{h}" if h < n_hidden else "head", new)
        if norms is not None and h < n_hidden:
            replace_module(model, f"norms.{h}", _shrink_norm(norms[h], keep[h]))
    if hasattr(model, "feature_dim"):
        model.feature_dim = links[-1].in_f
    report = CompactionReport(widths_before, tuple(lk.out_f for lk in links[:-1]), tuple(folded), tuple(cut),
                              links_before, tuple(lk.vals.numel() for lk in links), tuple(storage), sweeps)
    log.info("compacted MLP widths %s -> %s (%d sweeps), storage %s", list(report.widths_before),
             list(report.widths_after), sweeps, list(storage))
    return report


def apply_storage_rule_(model: nn.Module, rule: StorageRule | None = None) -> nn.Module:
    """Turn every ``SparseLinear`` of ``model`` that :class:`StorageRule` prefers dense into ``nn.Linear``."""
    rule = rule or StorageRule()
    for name, m in list(model.named_modules()):
        if isinstance(m, SparseLinear) and choose_storage(m.out_features, m.in_features, m.nnz(),
                                                          m.values.dtype, rule) == "dense":
            replace_module(model, name, _Links.of(m).build(rule, m.training, kind="dense"))
    return model


# ---------------------------------------------------------------- export folder
def _layer_entry(name: str, layer: nn.Module) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "kind": "sparse" if isinstance(layer, SparseLinear) else "dense",
                             "in_features": layer.in_features, "out_features": layer.out_features,
                             "bias": layer.bias is not None}
    if isinstance(layer, SparseLinear):
        entry.update(nnz=layer.nnz(), backend=layer.backend)
    return entry


def _architecture(model: nn.Module, builder: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    try:
        chain, norms, act = _mlp_parts(model)
    except ConfigError as err:
        if builder is None:
            raise ConfigError(f"{err}. To export a model that is not an MLP, pass builder={{'name', "
                              "'options', 'input_shape', 'num_classes', 'task'} (the arguments of "
                              "edgetune.models.build_model)") from None
        sparse = {n: _layer_entry(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)}
        return str(builder["name"]), {"builder": dict(builder), "sparse_layers": sparse}
    names = [*(f"layers.{i}" for i in range(len(chain) - 1)), "head"]
    arch: dict[str, Any] = {"in_features": chain[0].in_features, "num_classes": chain[-1].out_features,
                            "activation": act, "batch_norm": norms is not None,
                            "layers": [_layer_entry(n, m) for n, m in zip(names, chain, strict=True)]}
    if norms is not None:
        arch["norms"] = [{"eps": n.eps, "momentum": n.momentum, "affine": n.affine} for n in norms]
    return "mlp", arch


def save_exported(model: nn.Module, out_dir: str | Path, *, meta: Mapping[str, Any] | None = None,
                  builder: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (its state dict: sparse layers as int32 ``indices`` + ``values``) and
    ``manifest.json`` into ``out_dir``, each atomically, the manifest last. ``meta`` (JSON-able) is
    stored as is. An MLP is described by its layer list; any other model needs ``builder``
    (``name``, ``options``, ``input_shape``, ``num_classes``, ``task`` for the model registry)."""
    out = Path(out_dir)
    name, arch = _architecture(model, builder)
    floats = [t.dtype for t in model.state_dict().values() if t.is_floating_point()]
    sha = save_tensors(model.state_dict(), out / TENSORS, metadata={"format": FORMAT})
    manifest = {"format": FORMAT, "version": VERSION, "model": name, "architecture": arch,
                "dtype": str(floats[0]).removeprefix("torch.") if floats else "float32",
                "tensors": {"file": TENSORS, "sha256": sha, "bytes": (out / TENSORS).stat().st_size},
                "meta": dict(meta or {})}
    atomic_write_json(out / MANIFEST, manifest)
    log.info("exported %s to %s (%d bytes of tensors)", name, out, manifest["tensors"]["bytes"])
    return out


def _read_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{out} is not an edgetune export folder: {path} is missing. Create one with "
                              f"`edgetune export RUN_DIR --out {out}` (or save_exported in Python)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the export is damaged: export the run "
                              "again") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != FORMAT:
        raise CheckpointError(f"{path} is not an edgetune export manifest (format {fmt!r}, expected "
                              f"{FORMAT!r}); point load_exported at a folder written by `edgetune export`")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} has export version {manifest.get('version')!r} but this edgetune "
                              f"reads version {VERSION}; use the edgetune release that wrote it, or export "
                              "the run again")
    return manifest


def _sparse_from(entry: Mapping[str, Any], sd: Mapping[str, Tensor], name: str, device: str) -> SparseLinear:
    return SparseLinear(entry["in_features"], entry["out_features"], sd[f"{name}.indices"],
                        sd[f"{name}.values"], bias=entry["bias"], backend=entry.get("backend", "auto"),
                        device=device)


def _build_mlp(arch: Mapping[str, Any], sd: Mapping[str, Tensor], device: str) -> nn.Module:
    from edgetune.models.mlp import MLP

    entries = arch["layers"]
    widths = [e["out_features"] for e in entries[:-1]]
    names = [*(f"layers.{i}" for i in range(len(widths))), "head"]
    if [e["name"] for e in entries] != names:
        raise KeyError(f"layer names {[e['name'] for e in entries]} (expected {names})")
    model = MLP(arch["in_features"], arch["num_classes"], widths, arch["activation"], arch["batch_norm"],
                device="meta")  # placeholders, replaced below: no memory, no init
    for e in entries:
        if e["kind"] == "sparse":
            new: nn.Module = _sparse_from(e, sd, e["name"], device)
        else:
            new = nn.utils.skip_init(nn.Linear, e["in_features"], e["out_features"], bias=e["bias"],
                                     device=device, dtype=sd[f"{e['name']}.weight"].dtype)
        replace_module(model, e["name"], new)
    for i, n in enumerate(arch.get("norms") or []):
        replace_module(model, f"norms.{i}", nn.BatchNorm1d(widths[i], eps=n["eps"], momentum=n["momentum"],
                                                           affine=n["affine"], device=device,
                                                           dtype=sd[f"norms.{i}.running_mean"].dtype))
    return model


def _build_registered(arch: Mapping[str, Any], sd: Mapping[str, Tensor], device: str,
                      dtype: str) -> nn.Module:
    from edgetune.models.base import ModelSpec, build_model

    b = arch["builder"]
    spec = ModelSpec(input_shape=tuple(b["input_shape"]), num_classes=b["num_classes"], task=b["task"])
    model = build_model(b["name"], b["options"], spec, device=device, dtype=getattr(torch, dtype))
    for fqn, e in arch["sparse_layers"].items():
        replace_module(model, fqn, _sparse_from(e, sd, fqn, device))
    return model


def load_exported(out_dir: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild an exported model from ``out_dir`` alone (manifest + tensors), in eval mode.

    Raises :class:`CheckpointError` when the folder is not an export, the tensor file's SHA-256 differs
    from the manifest's (corrupt or changed), or the tensors do not fit the manifest.
    """
    out = Path(out_dir)
    manifest = _read_manifest(out)
    tinfo = manifest.get("tensors")
    tinfo = tinfo if isinstance(tinfo, dict) else {}
    fname = str(tinfo.get("file", ""))
    tpath = out / fname
    if Path(fname).name != fname or not fname or not tpath.is_file():
        raise CheckpointError(f"{out / MANIFEST} names tensor file {fname!r}, which is not in {out}; "
                              "copy the whole export folder, or export the run again")
    sha = sha256_file(tpath)
    if sha != tinfo.get("sha256"):
        raise CheckpointError(f"{tpath} is corrupt or was changed after export: its sha256 {sha[:16]}... "
                              f"differs from {str(tinfo.get('sha256'))[:16]}... in {MANIFEST}; export the "
                              "run again")
    sd = load_tensors(tpath, device=device)
    try:
        arch = manifest["architecture"]
        if manifest.get("model") == "mlp":
            model = _build_mlp(arch, sd, device)
        else:
            model = _build_registered(arch, sd, device, manifest.get("dtype", "float32"))
        model.load_state_dict(sd, strict=True)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as err:
        hint = ("" if manifest.get("model") == "mlp" else " Models other than MLPs rebuild from the model "
                "registry, which works only when sparse layers were the recipe's only change to the model.")
        raise CheckpointError(f"{tpath} does not fit the architecture in {out / MANIFEST}: "
                              f"{type(err).__name__}: {err}.{hint} Export the run again.") from None
    return model.eval()


# ---------------------------------------------------------------- export a run folder
@torch.no_grad()
def _compare(reference: nn.Module, exported: nn.Module, tensors: tuple[Tensor, ...],
             batch: int = 512) -> dict[str, float]:
    """Test accuracy of both models (targets ``tensors[-1]``, -100 ignored) and their largest logit gap."""
    right = [0, 0]
    count, gap = 0, 0.0
    for i in range(0, len(tensors[0]), batch):
        xs, y = [t[i : i + batch] for t in tensors[:-1]], tensors[-1][i : i + batch].reshape(-1)
        valid = y != -100
        pair = (reference(*xs), exported(*xs))
        for k, logits in enumerate(pair):
            right[k] += int(((logits.reshape(-1, logits.shape[-1]).argmax(-1) == y) & valid).sum())
        gap = max(gap, float((pair[1].double() - pair[0].double()).abs().max()))
        count += int(valid.sum())
    n = max(count, 1)
    return {"test_acc_before": right[0] / n, "test_acc_after": right[1] / n, "max_abs_logit_diff": gap}


@torch.no_grad()
def _latency_ms(model: nn.Module, tensors: tuple[Tensor, ...], batch: int, repeats: int) -> float:
    from edgetune.measure import measure_latency

    xs = [t[:batch] for t in tensors[:-1]]
    return measure_latency(lambda: model(*xs), warmup=3, repeats=repeats).median_s * 1e3


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, *, rule: StorageRule | None = None,
               latency_repeats: int = 20) -> dict[str, Any]:
    """Export the trained model of a finished run folder to ``out_dir`` (default ``RUN_DIR/export``).

    MLPs are compacted (:func:`compact_mlp_`); other models keep their neurons and only get the storage
    rule. The export is reloaded with :func:`load_exported` and compared with the run's model on its test
    split. Returns (and writes as ``export_report.json``) bytes, parameters, non-zeros, widths, CPU
    latency (median ms at batch 1 and 256) and test accuracy, each before and after.
    """
    import copy

    from edgetune.measure import bytes_on_disk, count_nonzeros, count_parameters
    from edgetune.runner import load_run_model

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "export"
    model, cfg, bundle = load_run_model(run_dir)
    reference = copy.deepcopy(model)
    test = tuple(bundle.test.tensors)
    report: dict[str, Any] = {"run_dir": str(run_dir), "out_dir": str(out), "model": cfg.model.name,
                              "bytes_before": bytes_on_disk(run_dir / "model.safetensors"),
                              "parameters_before": count_parameters(model),
                              "nonzeros_before": count_nonzeros(model)}
    try:
        _mlp_parts(model)
        compaction: CompactionReport | None = compact_mlp_(model, rule=rule)
    except ConfigError as err:
        log.info("no neuron compaction (%s): applying the storage rule only", err)
        compaction = None
        apply_storage_rule_(model, rule)
    shape = list(bundle.input_shape)
    builder = {"name": cfg.model.name, "options": cfg.model.options(), "input_shape": shape,
               "num_classes": bundle.num_classes, "task": bundle.task}
    meta = {"source_run": str(run_dir.resolve()), "dataset": bundle.name, "input_shape": shape,
            "num_classes": bundle.num_classes, "task": bundle.task, "class_names": list(bundle.class_names),
            "compaction": compaction.as_dict() if compaction else None}
    save_exported(model, out, meta=meta, builder=builder)
    exported = load_exported(out)
    report.update({"bytes_after": bytes_on_disk(out / TENSORS),
                   "parameters_after": count_parameters(exported),
                   "nonzeros_after": count_nonzeros(exported), "compacted": compaction is not None,
                   "widths_before": list(compaction.widths_before) if compaction else None,
                   "widths_after": list(compaction.widths_after) if compaction else None,
                   "storage": list(compaction.storage) if compaction else None})
    report.update(_compare(reference, exported, test))
    for b in (1, 256):  # timings last: the files are written and compared from untouched weights
        report[f"latency_ms_batch{b}_before"] = _latency_ms(reference, test, b, latency_repeats)
        report[f"latency_ms_batch{b}_after"] = _latency_ms(exported, test, b, latency_repeats)
    atomic_write_json(out / "export_report.json", report)
    log.info("exported %s: %d -> %d bytes, test acc %.4f -> %.4f", run_dir, report["bytes_before"],
             report["bytes_after"], report["test_acc_before"], report["test_acc_after"])
    return report
