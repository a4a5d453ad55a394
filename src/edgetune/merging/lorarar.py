"""LoRA.rar (Shenaj, Bohdal, Ozay, Zanuttigh, Michieli 2024, "LoRA.rar: Learning to Merge LoRAs via
Hypernetworks for Subject-Style Conditioned Image Generation"): a small hypernetwork, trained once on many LoRA
pairs, predicts ZipLoRA's merge coefficients of a new pair in one forward pass.

Generic over LoRA pairs of any edgetune model. The hypernetwork reads, for each column ``j`` of a layer's updates
``D_1``, ``D_2`` (``(out, in)``; columns = the input axis, as in :mod:`edgetune.merging.ziplora`), the features

    log u_1j, log u_2j, cos(D_1[:, j], D_2[:, j]), log(rms_1 / rms_2)

with ``u_ij = ||D_i[:, j]|| / rms_i`` and ``rms_i`` the root mean square of ``D_i``'s column norms. Why these: with
Gaussian inputs ZipLoRA's objective splits into one problem per column whose solution depends only on the 2x2 Gram
of the two columns up to a common scale -- their norm ratio and cosine -- plus the two adapters' relative size
(the normalised objective weighs each adapter by its own energy); ``u_ij`` also tells a column that carries an
adapter's learned change from one that only carries its random initialisation. The features do not depend on the
layer's size, so one network (weights shared across layers and models) serves every layer. (The authors' code
feeds the concatenated columns themselves, which ties the network to one ``out`` size.)

The network ``g`` maps ``(f_self, f_other, cos, ratio)`` to one coefficient, ``m_1j = 1 + g(u_1j, u_2j, c_j, r)``
and ``m_2j = 1 + g(u_2j, u_1j, c_j, -r)``, so swapping the adapters swaps the coefficients; its last layer starts
at zero, so an untrained network predicts the plain sum. :func:`train_lorarar` trains it with ZipLoRA's objective
(the predicted coefficients plugged into :func:`~edgetune.merging.ziplora.ziplora_objective`, on each training
pair's captured or Gaussian inputs); merging a new pair needs only its weights (:func:`predict_coefficients`,
:func:`lorarar_merge`). :func:`save_lorarar` / :func:`load_lorarar`: safetensors plus a JSON config.

``input_stats`` (an extension, not in the paper) adds :data:`STAT_FEATURES`: the energy of input feature ``j``
under each adapter's data, ``log(G_i[j, j] / mean_k G_i[k, k])`` -- the diagonals of the Gram matrices ZipLoRA
optimises on. Merging then needs those statistics (one ``(in,)`` vector per adapter and layer), still with no
per-pair optimisation. Where LoRA's ``A`` stays near its random initialisation (short training, small layers), a
column's norm says little about whether the adapter's inputs use that feature, and a weights-only network can do
no better than about the average of the updates; the merging-lora suite (``merging/bench/lora.py``) measures
both.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from edgetune.core.config import Config, validate
from edgetune.core.errors import CheckpointError, ConfigError
from edgetune.core.state import atomic_write_json, load_tensors, save_tensors
from edgetune.merging.lora_merge import LayerLora, Lora
from edgetune.merging.ziplora import (
    ZipLoraConfig,
    _check_pair,
    _pair_grams,
    pair_objective,
    zip_factors,
    ziplora_objective,
)

__all__ = ["FEATURES", "STAT_FEATURES", "LoraPair", "LoraRarConfig", "LoraRarNet", "column_features", "load_lorarar",
           "lorarar_merge", "predict_coefficients", "save_lorarar", "train_lorarar"]

log = logging.getLogger(__name__)

FEATURES = ("log_u_self", "log_u_other", "cos", "log_rms_ratio")
#: the features an ``input_stats`` network reads besides :data:`FEATURES`
STAT_FEATURES = ("log_e_self", "log_e_other")
WEIGHTS_FILE, CONFIG_FILE = "lorarar.safetensors", "lorarar.json"
_EPS = 1e-4  # floor of u (relative column norm) before the log


class LoraRarConfig(Config):
    """LoRA.rar (Shenaj et al. 2024). hidden / depth: the hypernetwork's width and number of hidden layers; steps /
    lr / pairs_per_step: Adam on the network over random batches of training pairs; cos_weight / normalize / samples:
    ZipLoRA's objective (lambda, per-adapter normalisation, Gaussian inputs for pairs without input statistics);
    seed: initialisation and batch order. input_stats: the network also reads the adapters' input statistics
    (:data:`STAT_FEATURES`, from each adapter's layer-input Gram matrices), which merging then needs (an extension:
    the paper's network reads the weights only)."""

    hidden: int = Field(default=32, ge=1)
    depth: int = Field(default=2, ge=1)
    steps: int = Field(default=400, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    pairs_per_step: int = Field(default=8, ge=1)
    cos_weight: float = Field(default=0.01, ge=0)
    normalize: bool = True
    samples: int = Field(default=256, ge=1)
    seed: int = Field(default=0, ge=0)
    input_stats: bool = False

    def objective(self) -> ZipLoraConfig:
        """The ZipLoRA objective this network is trained for."""
        return ZipLoraConfig(cos_weight=self.cos_weight, normalize=self.normalize, samples=self.samples,
                             seed=self.seed)


@dataclass(frozen=True)
class LoraPair:
    """Two LoRAs of one base model to merge, with the Gram matrices of each one's layer inputs (None: Gaussian)."""

    first: Lora
    second: Lora
    grams: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None


# ------------------------------------------------------------------------------------------ pure maths
def column_features(d1: Tensor, d2: Tensor, g1: Tensor | None = None, g2: Tensor | None = None) -> Tensor:
    """The per-column features of a pair of ``(out, in)`` updates: ``(in, 2, F)``, row ``[j, i]`` the features of
    adapter ``i``'s column ``j`` seen from adapter ``i`` (:data:`FEATURES`: self, other, cos, ratio). With the
    Gram matrices ``g_i (in, in)`` of the adapters' inputs, also :data:`STAT_FEATURES`: the input energy of feature
    ``j`` under each adapter, ``log(G_i[j, j] / mean_k G_i[k, k])``, of self and other."""
    n1, n2 = d1.norm(dim=0), d2.norm(dim=0)  # (in,)
    rms1, rms2 = n1.square().mean().sqrt(), n2.square().mean().sqrt()
    tiny = torch.finfo(d1.dtype).tiny
    lu1 = (n1 / rms1.clamp_min(tiny)).clamp_min(_EPS).log()
    lu2 = (n2 / rms2.clamp_min(tiny)).clamp_min(_EPS).log()
    cos = F.cosine_similarity(d1, d2, dim=0, eps=1e-12)  # (in,)
    ratio = (rms1.clamp_min(tiny).log() - rms2.clamp_min(tiny).log()).clamp(-10, 10).expand_as(cos)
    first, second = [lu1, lu2, cos, ratio], [lu2, lu1, cos, -ratio]
    if g1 is not None and g2 is not None:
        e1, e2 = g1.diagonal(), g2.diagonal()
        le1 = (e1 / e1.mean().clamp_min(tiny)).clamp_min(_EPS).log()
        le2 = (e2 / e2.mean().clamp_min(tiny)).clamp_min(_EPS).log()
        first, second = [*first, le1, le2], [*second, le2, le1]
    return torch.stack([torch.stack(first, dim=-1), torch.stack(second, dim=-1)], dim=1)


def _stats(grams: Sequence[Mapping[str, Tensor]] | None, path: str, n: int) -> tuple[Tensor, Tensor]:
    """Both adapters' Gram matrices ``(in, in)`` at ``path`` (a given diagonal ``(in,)`` becomes a diagonal matrix)."""
    if grams is None or len(grams) != 2:
        raise ConfigError("this LoRA.rar network reads the adapters' input statistics (input_stats): pass grams, one "
                          "{layer: Gram (in, in)} per adapter (see ziplora.layer_grams)")
    out = []
    for i, g in enumerate(grams):
        if path not in g:
            raise ConfigError(f"the input statistics of adapter {i} lack layer {path!r}")
        m = g[path] if g[path].dim() == 2 else torch.diag(g[path])
        if tuple(m.shape) != (n, n):
            raise ConfigError(f"the input statistics of adapter {i} at {path!r} have shape {tuple(g[path].shape)}; the "
                              f"layer takes {n} inputs")
        out.append(m)
    return out[0], out[1]


class LoraRarNet(nn.Module):
    """The hypernetwork: an MLP ``(..., F) -> (...)`` on :data:`FEATURES` (and :data:`STAT_FEATURES` with
    ``input_stats``), giving ``m = 1 + g(features)``."""

    def __init__(self, hidden: int = 32, depth: int = 2, input_stats: bool = False) -> None:
        super().__init__()
        sizes = [len(FEATURES) + (len(STAT_FEATURES) if input_stats else 0), *[hidden] * depth]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.GELU()]
        last = nn.Linear(sizes[-1], 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.hidden, self.depth, self.input_stats = hidden, depth, input_stats

    def forward(self, features: Tensor) -> Tensor:
        """``(..., F)`` features -> ``(...)`` coefficients."""
        return 1.0 + self.net(features).squeeze(-1)

    def coefficients(self, d1: Tensor, d2: Tensor, g1: Tensor | None = None, g2: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
        """``(m_1, m_2)`` (``(in,)`` each) for one layer's updates ``d_i (out, in)`` (and the Gram matrices ``g_i
        (in, in)`` of the adapters' inputs, for an ``input_stats`` network)."""
        if self.input_stats and (g1 is None or g2 is None):
            raise ConfigError("this LoRA.rar network reads the adapters' input statistics: pass g1 and g2")
        feats = column_features(d1, d2, g1, g2) if self.input_stats else column_features(d1, d2)
        m = self(feats.to(self.net[0].weight.dtype))  # (in, 2)
        return m[:, 0].to(d1.dtype), m[:, 1].to(d1.dtype)


# ------------------------------------------------------------------------------------------ train / predict
def _prepared(pair: LoraPair, cfg: LoraRarConfig) -> list[tuple[Tensor, ...]]:
    """Per layer: ``(d1, d2, g1, g2, features)`` of a pair (float32)."""
    two = (pair.first, pair.second)
    _check_pair(two)
    g1, g2 = _pair_grams(two, pair.grams, cfg.samples, cfg.seed)
    out = []
    for p, l1 in pair.first.items():
        d1, d2 = l1.delta().detach().float(), pair.second[p].delta().detach().float()
        gs = (g1[p].float(), g2[p].float())
        out.append((d1, d2, *gs, column_features(d1, d2, *gs) if cfg.input_stats else column_features(d1, d2)))
    return out


def _stacked(data: Sequence[list[tuple[Tensor, ...]]]) -> list[tuple[Tensor, ...]]:
    """The prepared layers of all pairs grouped by shape: ``(pair index (N,), d1 (N, out, in), d2, g1 (N, in, in), g2,
    features (N, in, 2, F))`` per group, so a training step runs one batched objective per layer shape."""
    groups: dict[tuple[int, ...], list[tuple[int, tuple[Tensor, ...]]]] = {}
    for i, layers in enumerate(data):
        for layer in layers:
            groups.setdefault(tuple(layer[0].shape), []).append((i, layer))
    return [(torch.tensor([i for i, _ in rows]), *(torch.stack([layer[k] for _, layer in rows]) for k in range(5)))
            for rows in groups.values()]


def _batch_loss(net: LoraRarNet, groups: Sequence[tuple[Tensor, ...]], batch: Tensor, cfg: LoraRarConfig) -> Tensor:
    """ZipLoRA's objective with the network's coefficients, averaged over the layers of the pairs in ``batch``."""
    total, count = torch.zeros(()), 0
    for idx, d1, d2, g1, g2, feats in groups:
        sel = torch.isin(idx, batch)
        if not bool(sel.any()):
            continue
        m = net(feats[sel])  # (n, in, 2)
        total = total + ziplora_objective(d1[sel], d2[sel], m[..., 0], m[..., 1], g1[sel], g2[sel],
                                          cos_weight=cfg.cos_weight, normalize=cfg.normalize).sum()
        count += int(sel.sum())
    return total / count


def train_lorarar(pairs: Sequence[LoraPair], cfg: LoraRarConfig | None = None,
                  held_out: Sequence[LoraPair] = ()) -> LoraRarNet:
    """Train a LoRA.rar hypernetwork on ``pairs`` with ZipLoRA's objective (mean over each batch's layers); logs the
    objective on ``held_out`` pairs beside the plain sum's. Pairs may come from models of different sizes."""
    cfg = cfg or LoraRarConfig()
    if not pairs:
        raise ConfigError("train_lorarar needs at least one training pair of LoRAs")
    torch.manual_seed(cfg.seed)
    net = LoraRarNet(cfg.hidden, cfg.depth, cfg.input_stats)
    groups = _stacked([_prepared(p, cfg) for p in pairs])
    rng = random.Random(cfg.seed)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    for step in range(cfg.steps):
        batch = torch.tensor(rng.sample(range(len(pairs)), min(cfg.pairs_per_step, len(pairs))))
        opt.zero_grad(set_to_none=True)
        loss = _batch_loss(net, groups, batch, cfg)
        loss.backward()
        opt.step()
        if step % max(1, cfg.steps // 5) == 0 or step == cfg.steps - 1:
            log.debug("LoRA.rar step %d: objective %.4g", step, float(loss.detach()))
    net.eval()
    if held_out:
        zcfg = cfg.objective()
        plain = sum(pair_objective((p.first, p.second), None, p.grams, zcfg) for p in held_out) / len(held_out)
        got = sum(pair_objective((p.first, p.second), predict_coefficients(net, (p.first, p.second), p.grams),
                                 p.grams, zcfg) for p in held_out) / len(held_out)
        log.info("LoRA.rar trained on %d pairs: held-out objective %.4g (plain sum %.4g)", len(pairs), got, plain)
    return net


@torch.no_grad()
def predict_coefficients(net: LoraRarNet, pair: Sequence[Mapping[str, LayerLora]],
                         grams: Sequence[Mapping[str, Tensor]] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer ``(m_1, m_2)`` of a pair of LoRAs, in one forward pass of the hypernetwork: from the weights alone,
    or with an ``input_stats`` network also from ``grams`` (one ``{layer: Gram or its diagonal}`` per adapter)."""
    _check_pair(pair)
    out = {}
    for p, l1 in pair[0].items():
        d1, d2 = l1.delta(), pair[1][p].delta()
        gs = _stats(grams, p, l1.shape[1]) if net.input_stats else (None, None)
        out[p] = net.coefficients(d1, d2, *(g.to(d1.dtype) if g is not None else None for g in gs))
    return out


def lorarar_merge(net: LoraRarNet, pair: Sequence[Mapping[str, LayerLora]],
                  grams: Sequence[Mapping[str, Tensor]] | None = None) -> Lora:
    """The pair merged with the predicted coefficients, as a LoRA of rank ``r_1 + r_2`` per layer."""
    coefs = predict_coefficients(net, pair, grams)
    return {p: zip_factors(l1, pair[1][p], *coefs[p]) for p, l1 in pair[0].items()}


# ------------------------------------------------------------------------------------------ files
def _feature_names(input_stats: bool) -> list[str]:
    return [*FEATURES, *(STAT_FEATURES if input_stats else ())]


def save_lorarar(net: LoraRarNet, folder: str | Path, cfg: LoraRarConfig | None = None) -> list[Path]:
    """Write the network to ``folder``: ``lorarar.safetensors`` and ``lorarar.json`` (architecture, features, the
    training config); return the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = (cfg or LoraRarConfig()).replace(hidden=net.hidden, depth=net.depth, input_stats=net.input_stats)
    weights, conf = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    save_tensors(net.state_dict(), weights)
    atomic_write_json(conf, {"format": 1, "method": "lorarar", "features": _feature_names(net.input_stats),
                             "config": cfg.to_dict()})
    return [conf, weights]


def load_lorarar(folder: str | Path) -> LoraRarNet:
    """The hypernetwork saved in ``folder`` by :func:`save_lorarar` (in eval mode)."""
    folder = Path(folder)
    weights, conf_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not conf_path.is_file() or not weights.is_file():
        raise ConfigError(f"{folder} lacks {CONFIG_FILE} or {WEIGHTS_FILE}; point at a folder save_lorarar wrote")
    try:
        conf = json.loads(conf_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{conf_path} is not readable JSON ({err})") from err
    cfg = validate(LoraRarConfig, conf.get("config", {}), "lorarar config")
    if conf.get("method") != "lorarar" or conf.get("features") != _feature_names(cfg.input_stats):
        raise CheckpointError(f"{conf_path} is not a LoRA.rar network of this edgetune (features "
                              f"{conf.get('features')}, expected {_feature_names(cfg.input_stats)})")
    net = LoraRarNet(cfg.hidden, cfg.depth, cfg.input_stats)
    try:
        net.load_state_dict(load_tensors(weights))
    except Exception as err:  # safetensors' and torch's own error types
        raise CheckpointError(f"{weights} does not hold this network's tensors ({type(err).__name__}: {err})") from err
    net.eval()
    if not all(bool(torch.isfinite(p.detach()).all()) for p in net.parameters()):
        raise CheckpointError(f"{weights} holds non-finite weights")
    return net
