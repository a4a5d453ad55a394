"""HOP: continual text learning with an adapter per problem, moment pooling without [CLS] and a head per problem.

Michieli & Ozay, "HOP to the Next Tasks and Domains for Continual Learning in NLP", AAAI 2024, arXiv 2402.18449
(no official code; built from the abstract and summaries, research notes section 1.5). Three ideas on a frozen
pre-trained encoder (MiniLM here):

1. a set of adapters per problem (LoRA from :mod:`edgetune.adapters` stands in for the paper's Adapter-BERT
   bottleneck adapters): learning problem ``t`` trains only its own adapter and head, so nothing learned for
   earlier problems changes;
2. high-order pooling: the token features are pooled into moments ``[m_1; m_2; ...]`` (mean, std, standardized
   higher orders: :func:`~edgetune.incremental.pooling.moment_pool`) with the [CLS] token and padding left out;
3. an auxiliary MLP head per problem on that vector.

Settings. Task-incremental: every problem has its own classes and the problem is named at test
(``predict(texts, problem=name)``). Domain-incremental: the problems share one label space and the problem is
not given at test (``predict(texts)``). The paper's text that could be read says only that the heads are
"specialized for each end problem"; it does not say how the adapter is picked when the problem is unknown. So
that rule is an option, ``select``: ``confidence`` (default; run every problem's adapter and head and keep the
answer of the problem whose top class probability is highest), ``entropy`` (lowest prediction entropy) or
``average`` (mean of every problem's class probabilities). Naming the problem is the "problem given" reference.

Ablations and baselines are the same class with one idea switched off: ``pool="cls"`` or ``orders=[1]`` (mean
pooling), ``adapters="shared"`` (one adapter trained problem after problem: fine-tuning in sequence) or
``"full"`` (the whole encoder trained in sequence), ``heads="shared"`` (one head for a shared label space),
and :meth:`HopModel.learn_jointly` (all problems at once: the multitask upper bound).

Choices of this implementation: the encoder runs in eval mode while training too (no dropout: tens of steps per
problem), the head is ``LayerNorm -> Linear -> GELU -> Linear`` (``head_hidden=0``: ``LayerNorm -> Linear``) so
the mean and std blocks, of different scales, train at one learning rate, and a problem name learned twice is
refused (continuing would silently change what the first call learned).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetune.adapters.lora import LoraConfig
from edgetune.adapters.model import (
    adapter_state_dict,
    add_adapter_,
    load_adapter_state_,
    set_active_adapters_,
)
from edgetune.core.config import validate
from edgetune.core.errors import CheckpointError, ConfigError, DataError, did_you_mean
from edgetune.core.state import atomic_write_json, load_tensors, save_tensors, sha256_file
from edgetune.data.transforms import TrimPadding
from edgetune.incremental.hop_config import HopConfig, check_data, class_names
from edgetune.incremental.hop_pooling import content_mask, hop_features, select_problem

__all__ = ["HopConfig", "HopModel", "content_mask", "hop_features", "select_problem"]  # the last three re-exported

log = logging.getLogger(__name__)
FORMAT = "edgetune-hop"
VERSION = 1


# ------------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class _Problem:
    name: str
    classes: tuple[str, ...]
    adapter: str | None  # adapter name on the encoder (None: adapters="full")
    head: str  # key in HopModel.heads


def _hidden_size(encoder: nn.Module) -> int:
    config = getattr(encoder, "config", None)
    for attr in ("hidden_size", "d_model", "dim"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"cannot tell the token feature width of a {type(encoder).__name__} (its config has no "
                      "hidden_size); give a Hugging Face encoder such as BertModel")


class HopModel(nn.Module):
    """A frozen encoder with one adapter and one head per problem (see the module docstring).

    encoder: a Hugging Face encoder (``BertModel``...) or edgetune's ``FeatureEncoder`` around one; its forward
    takes ``input_ids`` and ``attention_mask`` and returns ``last_hidden_state (B, L, D)``. tokenizer: its
    tokenizer (a Hugging Face one, or any callable in that convention with ``cls_token_id``).
    """

    def __init__(self, encoder: nn.Module, tokenizer: Any, cfg: HopConfig | None = None, **fields: Any) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else HopConfig()
        self.cfg = cfg.replace(**fields) if fields else cfg
        inner = getattr(encoder, "encoder", None)
        if type(encoder).__name__ == "FeatureEncoder" and isinstance(inner, nn.Module):
            encoder = inner  # its forward pools; HOP pools the tokens itself
        self.encoder = encoder
        self.encoder.requires_grad_(self.cfg.adapters == "full")
        self.tokenizer = tokenizer
        self.cls_token_id: int | None = getattr(tokenizer, "cls_token_id", None)
        self.hidden_size = _hidden_size(encoder)
        self.heads = nn.ModuleDict()
        self._problems: dict[str, _Problem] = {}

    # ---------------------------------------------------------------------------------- problems
    @property
    def problems(self) -> list[str]:
        """Names of the learned problems, in the order they were learned."""
        return list(self._problems)

    def classes(self, problem: str) -> tuple[str, ...]:
        return self._problem(problem).classes

    def _problem(self, name: str) -> _Problem:
        if name not in self._problems:
            known = self.problems
            raise ConfigError(f"unknown problem {name!r}.{did_you_mean(name, known)} Learned problems: "
                              f"{known or '(none yet: call learn_problem first)'}")
        return self._problems[name]

    @property
    def feature_size(self) -> int:
        return self.hidden_size * (len(self.cfg.orders) if self.cfg.pool == "moments" else 1)

    def _new_head(self, n_classes: int, seed: int) -> nn.Module:
        f, h = self.feature_size, self.cfg.head_hidden
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers = [nn.LayerNorm(f), *((nn.Linear(f, h), nn.GELU(), nn.Linear(h, n_classes)) if h else
                                        (nn.Linear(f, n_classes),))]
            head = nn.Sequential(*layers)
        return head.to(self._device())

    def _device(self) -> torch.device:
        p = next(self.encoder.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _check_new(self, name: str, classes: tuple[str, ...]) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a problem needs a non-empty name, got {name!r}")
        if name in self._problems:
            raise ConfigError(f"problem {name!r} is already learned; HOP refuses to learn a name twice (that would "
                              "change its adapter and head). Give the new data another problem name")
        cfg = self.cfg
        first = next(iter(self._problems.values()), None)
        if cfg.heads == "shared" and first is not None and classes != first.classes:
            raise ConfigError(f"heads='shared' needs every problem to have the classes {list(first.classes)}; "
                              f"problem {name!r} has {list(classes)}. Use heads='per_problem' for problems with "
                              "their own classes")

    def _register(self, name: str, classes: tuple[str, ...]) -> tuple[_Problem, list[nn.Parameter]]:
        """Add problem ``name`` (its adapter and head, new or shared); return it and the parameters to train."""
        self._check_new(name, classes)
        index, cfg = len(self._problems), self.cfg
        first = next(iter(self._problems.values()), None)
        params: list[nn.Parameter] = []
        adapter: str | None = None
        if cfg.adapters == "full":
            params += list(self.encoder.parameters())
        else:
            adapter = f"problem{index}" if cfg.adapters == "per_problem" else "shared"
            if first is None or cfg.adapters == "per_problem":
                add_adapter_(self.encoder, LoraConfig(rank=cfg.rank, alpha=cfg.alpha, targets=list(cfg.targets)),
                             name=adapter, seed=cfg.seed + index, freeze=True)
            params += adapter_params(self.encoder, adapter)
        head = f"problem{index}" if cfg.heads == "per_problem" else "shared"
        if head not in self.heads:
            self.heads[head] = self._new_head(len(classes), cfg.seed + index)
        problem = _Problem(name, classes, adapter, head)
        self._problems[name] = problem
        return problem, params

    # ---------------------------------------------------------------------------------- forward
    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask`` ``(N, T)`` int64 of ``texts``, cut at ``max_length`` tokens."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise DataError("give the texts as a list of strings")
        if len(texts) == 0:
            empty = torch.zeros(0, 0, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone()}
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.cfg.max_length, padding="longest",
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def features(self, batch: Mapping[str, Tensor], problem: str) -> Tensor:
        """Pooled features ``(B, F)`` of a tokenized batch through ``problem``'s adapter."""
        p = self._problem(problem)
        if p.adapter is not None:
            set_active_adapters_(self.encoder, [p.adapter])
        ids = batch["input_ids"].to(self._device())
        am = batch["attention_mask"].to(self._device())
        out = self.encoder(input_ids=ids, attention_mask=am)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, L, D)
        cls_index = None
        if self.cls_token_id is not None and self.cfg.pool == "cls":
            cls_index = ids.eq(self.cls_token_id).int().argmax(1)  # first [CLS] (0 when there is none)
        return hop_features(hidden, content_mask(ids, am, self.cls_token_id), self.cfg.pool, self.cfg.orders,
                            cls_index=cls_index, standardize=self.cfg.standardize)

    def logits(self, batch: Mapping[str, Tensor], problem: str) -> Tensor:
        """Class scores ``(B, C)`` of ``problem`` for a tokenized batch."""
        return self.heads[self._problem(problem).head](self.features(batch, problem))

    def _as_batch(self, inputs: Sequence[str] | Mapping[str, Tensor]) -> dict[str, Tensor]:
        if isinstance(inputs, Mapping):
            missing = {"input_ids", "attention_mask"} - set(inputs)
            if missing:
                raise DataError(f"a tokenized batch needs input_ids and attention_mask; it lacks {sorted(missing)}")
            return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        return self.tokenize(inputs)

    @torch.no_grad()
    def predict_proba(self, inputs: Sequence[str] | Mapping[str, Tensor], problem: str,
                      batch_size: int = 64) -> Tensor:
        """Class probabilities ``(N, C)`` of ``problem`` for texts or a tokenized batch (eval mode, batched)."""
        self._problem(problem)
        batch, was = self._as_batch(inputs), self.training
        self.eval()
        try:
            n = batch["input_ids"].shape[0]
            parts = [self.logits(_trim({k: v[i:i + batch_size] for k, v in batch.items()}), problem).softmax(1)
                     for i in range(0, n, batch_size)]
        finally:
            self.train(was)
        return torch.cat(parts) if parts else torch.zeros(0, len(self.classes(problem)))

    @torch.no_grad()
    def predict(self, inputs: Sequence[str] | Mapping[str, Tensor], problem: str | None = None,
                *, select: str | None = None, return_problem: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Labels ``(N,)`` (class indices of the problem's ``classes``).

        problem: the problem's name (task-incremental, or the "problem given" reference); None picks it by
        ``select`` (default ``cfg.select``) among every learned problem, which must share their classes
        (domain-incremental). return_problem: also return each example's chosen problem index ``(N,)``.
        """
        if not self._problems:
            raise ConfigError("no problem is learned yet; call learn_problem first")
        if problem is not None or len({(p.adapter, p.head) for p in self._problems.values()}) == 1:
            name = problem if problem is not None else self.problems[-1]  # one adapter and head: any name will do
            labels = self.predict_proba(inputs, name).argmax(1)
            chosen = torch.full_like(labels, self.problems.index(name))
            return (labels, chosen) if return_problem else labels
        sets = {p.classes for p in self._problems.values()}
        if len(sets) > 1:
            raise ConfigError(f"the learned problems have different classes ({len(sets)} label sets), so the problem "
                              "cannot be guessed; name it: predict(texts, problem=...). Known problems: "
                              f"{self.problems}")
        batch = self._as_batch(inputs)
        probs = torch.stack([self.predict_proba(batch, name) for name in self.problems])  # (K, N, C)
        labels, chosen = select_problem(probs, select or self.cfg.select)
        return (labels, chosen) if return_problem else labels

    # ---------------------------------------------------------------------------------- learning
    def learn_problem(self, name: str, texts: Sequence[str], labels: Tensor | Sequence[int],
                      classes: Sequence[str] | int) -> dict[str, Any]:
        """Learn problem ``name`` from ``texts`` and ``labels (N,)`` (indices into ``classes``: names or a count).

        Trains its adapter and head (``cfg.steps`` Adam steps); every earlier problem's tensors stay as they
        were. Returns ``{"loss": final loss, "seconds": ..., "trainable": parameters trained}``.
        """
        return self.learn_jointly([(name, texts, labels, classes)], steps=self.cfg.steps)

    def learn_jointly(self, problems: Sequence[tuple[str, Sequence[str], Tensor | Sequence[int], Sequence[str] | int]],
                      steps: int | None = None) -> dict[str, Any]:
        """Learn several problems at once (the multitask upper bound), a batch of each in turn, for ``steps``
        (default ``cfg.steps`` per problem) steps; needs ``adapters`` shared or full when there are several."""
        if not problems:
            raise DataError("learn_jointly got no problems")
        if len(problems) > 1 and self.cfg.adapters == "per_problem":
            raise ConfigError("learning problems jointly needs one encoder update for all of them: set "
                              "adapters='shared' or 'full' (per-problem adapters learn one problem at a time)")
        names = [p[0] for p in problems]
        if len(set(names)) != len(names):
            raise ConfigError(f"problem names repeat in one call: {names}")
        # every check before the model changes: a refused call leaves it as it was
        data = [check_data(name, texts, labels, class_names(classes)) for name, texts, labels, classes in problems]
        for name, _, _, classes in problems:
            self._check_new(name, class_names(classes))
        if self.cfg.heads == "shared" and len({class_names(p[3]) for p in problems}) > 1:
            raise ConfigError(f"heads='shared' needs every problem to have the same classes; problems {names} do not")
        tokens = [(name, self.tokenize(texts), y) for name, (texts, y) in zip(names, data, strict=True)]
        params = []
        for name, _, _, classes in problems:
            problem, ps = self._register(name, class_names(classes))
            params += ps + list(self.heads[problem.head].parameters())
        groups = self._param_groups(params)
        opt = torch.optim.Adam(groups)
        steps = steps if steps is not None else self.cfg.steps * len(problems)
        gens = [torch.Generator().manual_seed(self.cfg.seed + len(self._problems) - len(problems) + i)
                for i in range(len(problems))]
        orders: list[list[int]] = [[] for _ in problems]
        t0, loss = time.perf_counter(), torch.zeros(())
        self.eval()  # no dropout: see the module docstring
        for step in range(steps):
            k = step % len(problems)
            name, batch, y = tokens[k]
            if len(orders[k]) < self.cfg.batch_size:  # epochs of a seeded permutation
                orders[k] += torch.randperm(len(y), generator=gens[k]).tolist() * max(1, -(-self.cfg.batch_size
                                                                                         // len(y)))
            idx, orders[k] = torch.tensor(orders[k][:self.cfg.batch_size]), orders[k][self.cfg.batch_size:]
            logits = self.logits(_trim({key: v[idx] for key, v in batch.items()}), name)
            loss = F.cross_entropy(logits, y[idx].to(logits.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        secs = time.perf_counter() - t0
        trainable = sum(p.numel() for g in groups for p in g["params"])
        log.info("HOP learned %s: %d steps, final loss %.4f, %.1f s, %d parameters trained", names, steps,
                 float(loss.detach()), secs, trainable)
        return {"loss": float(loss.detach()), "seconds": secs, "trainable": trainable, "steps": steps}

    def _param_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        head_ids = {id(p) for p in self.heads.parameters()}
        unique = list({id(p): p for p in params}.values())
        for p in unique:
            p.requires_grad_(True)
        enc = [p for p in unique if id(p) not in head_ids]
        heads = [p for p in unique if id(p) in head_ids]
        return [g for g in ({"params": enc, "lr": self.cfg.lr}, {"params": heads, "lr": self.cfg.head_lr})
                if g["params"]]

    # ---------------------------------------------------------------------------------- save / load
    def state_tensors(self) -> dict[str, Tensor]:
        """Everything learned: ``adapter.<name>.*``, ``head.<key>.*`` and (adapters="full") ``encoder.*``."""
        out: dict[str, Tensor] = {}
        for adapter in dict.fromkeys(p.adapter for p in self._problems.values() if p.adapter is not None):
            out.update({f"adapter.{adapter}.{k}": v for k, v in adapter_state_dict(self.encoder, adapter).items()})
        out.update({f"head.{k}": v.detach() for k, v in self.heads.state_dict().items()})
        if self.cfg.adapters == "full":
            out.update({f"encoder.{k}": v.detach() for k, v in self.encoder.state_dict().items()})
        return out

    def save(self, folder: str | Path) -> Path:
        """Write ``hop.json`` (config, problems, the tensors' sha256) and ``hop.safetensors`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        digest = save_tensors(self.state_tensors(), folder / "hop.safetensors")
        meta = {"format": FORMAT, "version": VERSION, "config": self.cfg.to_dict(), "sha256": digest,
                "problems": [{"name": p.name, "classes": list(p.classes), "adapter": p.adapter, "head": p.head}
                             for p in self._problems.values()]}
        atomic_write_json(folder / "hop.json", meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path, encoder: nn.Module, tokenizer: Any) -> HopModel:
        """The model saved in ``folder``, on ``encoder`` (the same pretrained encoder it was trained on)."""
        folder = Path(folder)
        meta_path, tensor_path = folder / "hop.json", folder / "hop.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise CheckpointError(f"{folder} holds no saved HOP model (hop.json and hop.safetensors); save one with "
                                  "HopModel.save(folder)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{meta_path} is not readable JSON ({err}); save the model again") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise CheckpointError(f"{meta_path} is not a version-{VERSION} {FORMAT} file (format "
                                  f"{meta.get('format')!r}, version {meta.get('version')!r})")
        if sha256_file(tensor_path) != meta.get("sha256"):
            raise CheckpointError(f"{tensor_path} does not match the sha256 in {meta_path}: the file is damaged or "
                                  "from another save; save the model again")
        model = cls(encoder, tokenizer, validate(HopConfig, meta["config"], where="hop.json config"))
        for p in meta["problems"]:
            model._register(p["name"], class_names(p["classes"]))
        state = load_tensors(tensor_path, model._device())
        own = model.state_tensors()
        if set(own) != set(state):
            raise CheckpointError(f"{tensor_path} holds other tensors than this encoder's HOP model expects "
                                  f"(missing {sorted(set(own) - set(state))[:3]}, unexpected "
                                  f"{sorted(set(state) - set(own))[:3]}); load it on the encoder it was trained on")
        for adapter in dict.fromkeys(p.adapter for p in model._problems.values() if p.adapter is not None):
            prefix = f"adapter.{adapter}."
            load_adapter_state_(model.encoder, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                adapter)
        model.heads.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        if model.cfg.adapters == "full":
            model.encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
        model.encoder.requires_grad_(False)
        model.heads.requires_grad_(False)
        return model.eval()


def adapter_params(encoder: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The trainable factors of the adapter ``adapter`` on ``encoder``."""
    return [p for n, p in encoder.named_parameters() if f".adapters.{adapter}." in f".{n}"]


_TRIM = TrimPadding()


def _trim(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return _TRIM(batch)  # type: ignore[return-value]
