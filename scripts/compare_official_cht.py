#!/usr/bin/env python
"""Side by side: the official CHTs MLP code and ``sparse/fmnist-mlp-1pct-official``, same machine (issue 16).

The official code (``biomedical-cybernetics/Cannistraci-Hebb-training``, ``mlp_and_cnn/run.py``) is run unchanged
on the CPU with its README's CHTs command on Fashion-MNIST; only its environment is adapted: ``torch.cuda``
device calls become no-ops and the device is ``cpu``; ``wandb`` (disabled by ``--no_log`` anyway), ``pandas``
(HIGGS loader only) and ``torchvision`` (FashionMNIST from the local IDX files, ``ToTensor``, ``Normalize``,
``Compose``, with torchvision's numerics) are small stand-ins written to the work folder; ``CH_scores`` is the
C++ extension built from the repository's sources by ``edgetune.sparse.bench.official_cht.load_official``.
A checkpoint after each epoch (model, optimizer, scheduler state, random states) lets the same command
continue an interrupted run exactly; the per-epoch test accuracies go to ``epochs.json``. edgetune's side is the bench suite with the official
per-epoch learning rate, so both decay the learning rate the same way::

    # 1. the official code, one seed per call (about 2 min an epoch on one core)
    .venv/bin/python scripts/compare_official_cht.py official --src /path/to/Cannistraci-Hebb-training \\
        --epochs 20 --seed 0 --work /tmp/cht-official
    # 2. edgetune, the same epochs and seeds
    .venv/bin/edgetune bench sparse-quality recipe=sparse/fmnist-mlp-1pct-official "methods=[chts]" \\
        "seeds=[0,1,2]" epochs=20 "set=[train.schedule.per_epoch=true,train.schedule.end_fraction=0.9]" \\
        --work-dir /tmp/cht-edgetune --out /tmp/cht-edgetune.csv
    # 3. the comparison: per-epoch CSV, markdown table and curves (without --edgetune: the official runs
    #    alone; --partial: official runs that have not finished, on their planned schedule)
    .venv/bin/python scripts/compare_official_cht.py report --official /tmp/cht-official \\
        --edgetune /tmp/cht-edgetune --out bench/results/sparse-official-side-by-side

To tell which phase of a run two codes part in, ``handoff`` writes an edgetune checkpoint taken at an epoch's
end (weights, masks, momentum, EM_S position) as an official run folder; the same ``official`` command then
continues edgetune's state in the official code for the remaining epochs (a paired comparison: one state, two
codes; ``report`` on that folder with ``--edgetune`` at the run the checkpoint came from adds the mean of each code
over the epochs after the handoff)::

    .venv/bin/python scripts/compare_official_cht.py handoff \\
        --checkpoint RUN/checkpoints/step-000138750.json --epochs 100 --seed 1 --work /tmp/cht-handoff
    .venv/bin/python scripts/compare_official_cht.py official --src /path/to/Cannistraci-Hebb-training \\
        --epochs 100 --seed 1 --work /tmp/cht-handoff

``adopt`` is the other way: an official checkpoint taken at an epoch's end (the ``official`` command keeps only
the newest, ``RUN/checkpoint.pt``; copy it at the epoch wanted) becomes an edgetune run folder that continues the
official code's network with edgetune's loop position, schedule and data order from edgetune's checkpoint at the
same epoch::

    .venv/bin/python scripts/compare_official_cht.py adopt --official /tmp/cht-official/e100-s1 \
        --checkpoint /tmp/e40.pt --template RUN/checkpoints/step-000075000.json --out /tmp/cht-adopt/a-e100-chts-s1
    .venv/bin/edgetune run --resume /tmp/cht-adopt/a-e100-chts-s1
    .venv/bin/python scripts/compare_official_cht.py report --official /tmp/cht-official --edgetune /tmp/cht-adopt \
        --out /tmp/adopt-report

The official code is NOT part of edgetune; nothing in the library or the tests imports this script.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

README_CHTS = [  # the README's "CHTs on EMNIST-MLP" command, dataset Fashion_MNIST
    "--batch_size", "32", "--dataset", "Fashion_MNIST", "--network_structure", "mlp", "--weight_decay", "5e-04",
    "--regrow_method", "CH3_L3p_soft", "--init_mode", "swi", "--linearlr", "--learning_rate", "0.025",
    "--cuda_device", "0", "--dim", "2", "--update_interval", "1", "--self_correlated_sparse", "--no_log",
    "--chain_removal", "--zeta", "0.3", "--remove_method", "weight_magnitude", "--sparsity", "0.99",
    "--dst_scheduler", "--EM_S",
]  # fmt: skip

SHIMS = {
    "wandb.py": '''"""Stand-in for wandb: the official script logs with mode='disabled' under --no_log."""
class _Run:
    def log(self, *a, **k): pass
    def finish(self, *a, **k): pass
def init(*a, **k): return _Run()
def log(*a, **k): pass
''',
    "pandas.py": '"""Stand-in: only the official HIGGS loader uses pandas."""\n',
    "torchvision/__init__.py": '''"""Stand-in for the part of torchvision the official MLP code uses."""
from . import datasets, transforms  # noqa: F401
''',
    "torchvision/transforms.py": """import torch
class Compose:
    def __init__(self, ts): self.ts = ts
    def __call__(self, x):
        for t in self.ts: x = t(x)
        return x
class ToTensor:  # uint8 (H, W) -> float32 (1, H, W) in [0, 1], as torchvision does for a PIL 'L' image
    def __call__(self, x): return x.to(torch.float32).div(255).unsqueeze(0)
class Normalize:
    def __init__(self, mean, std): self.mean, self.std = float(mean[0]), float(std[0])
    def __call__(self, x): return (x - self.mean) / self.std
""",
    "torchvision/datasets.py": """import gzip, os
import numpy as np
import torch
def _idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims).copy())
class FashionMNIST(torch.utils.data.Dataset):
    def __init__(self, root=None, train=True, transform=None, download=False, **_):
        d, p = os.environ["CHT_FMNIST_DIR"], "train" if train else "t10k"
        self.data = _idx(os.path.join(d, f"{p}-images-idx3-ubyte.gz"))
        self.targets = _idx(os.path.join(d, f"{p}-labels-idx1-ubyte.gz")).long()
        self.transform = transform
    def __len__(self): return len(self.targets)
    def __getitem__(self, i):
        x = self.data[i]
        return (self.transform(x) if self.transform is not None else x), int(self.targets[i])
""",
}

CHILD = """import json, os, random, sys, time
import numpy as np
official, threads, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
import torch
torch.set_num_threads(threads)
torch.cuda.set_device = lambda *a, **k: None
sys.path[:0] = [official]
import run  # the official script, run by its own train_model; Train/Test wrapped to checkpoint each epoch
CK, EP = "checkpoint.pt", "epochs.json"
ck = torch.load(CK, weights_only=False) if os.path.exists(CK) else None
start = ck["next_epoch"] if ck else 0
accs = json.load(open(EP))[:start] if ck else []
seen = {}
_train, _test = run.Train, run.Test
def _save(path, obj, write):
    write(obj, path + ".tmp")
    os.replace(path + ".tmp", path)
def _dump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f)
def Train(args, model, device, loader, optimizer, epoch, warmup, pruner=None):
    seen.update(epoch=epoch, optimizer=optimizer, pruner=pruner)
    if epoch < start:  # trained before the restart: the loop still steps the learning-rate scheduler
        return
    if epoch == start and ck is not None:
        lrs = [g["lr"] for g in optimizer.param_groups]
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        pruner.load_state_dict(ck["pruner"])
        torch.set_rng_state(ck["torch_rng"]); np.random.set_state(ck["np_rng"]); random.setstate(ck["py_rng"])
        print(f"resumed before epoch {epoch}", flush=True)
    _train(args, model, device, loader, optimizer, epoch, warmup, pruner)
def Test(model, device, loader):
    epoch = seen["epoch"]
    if epoch < start:
        return np.array(0.0), np.array(0.0), 0.0
    top1, top5, loss = _test(model, device, loader)
    accs.append(float(top1) / 100)
    state = {"next_epoch": epoch + 1, "model": model.state_dict(), "optimizer": seen["optimizer"].state_dict(),
             "pruner": seen["pruner"].state_dict(), "torch_rng": torch.get_rng_state(),
             "np_rng": np.random.get_state(), "py_rng": random.getstate()}
    _save(CK, state, torch.save)
    _save(EP, accs, _dump)
    return top1, top5, loss
run.Train, run.Test = Train, Test
sys.argv = ["run.py", *rest]
a = run.args()
t0 = time.time()
run.train_model(a.seed, "cpu", a)
print(f"wall_time_s {time.time() - t0:.1f}")
"""


def _official(args: argparse.Namespace) -> None:
    from edgetune.sparse.bench.official_cht import load_official

    src = Path(args.src).expanduser().resolve()
    data = Path(args.data).expanduser().resolve()
    need = [f"{p}-{k}-idx{d}-ubyte.gz" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
    if missing := [n for n in need if not (data / n).is_file()]:
        raise SystemExit(f"--data {data} lacks {', '.join(missing)}: point it at the Fashion-MNIST IDX files")
    ext = Path(load_official(src).__file__).parent
    work = Path(args.work).expanduser().resolve()
    shims = work / "shims"
    for name, text in SHIMS.items():
        (shims / name).parent.mkdir(parents=True, exist_ok=True)
        (shims / name).write_text(text)
    (shims / "cht_child.py").write_text(CHILD)
    run_dir = work / f"e{args.epochs}-s{args.seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        CHT_FMNIST_DIR=str(data),
        PYTHONPATH=os.pathsep.join([str(shims), str(ext)]),
    )
    cmd = [
        sys.executable,
        str(shims / "cht_child.py"),
        str(src / "mlp_and_cnn"),
        str(args.threads),
        *README_CHTS,
        "--epochs",
        str(args.epochs),
        "--seed",
        str(args.seed),
    ]
    print("running:", " ".join(cmd), "\nlog:", run_dir / "log.txt", flush=True)
    with open(run_dir / "log.txt", "a") as log:
        done = subprocess.run(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    accs = official_accuracies(run_dir)
    print(f"exit {done.returncode}; {len(accs)} epochs; last test accuracy {accs[-1] if accs else 'none'}")


_OFFICIAL_LAYERS = ("Linear1", "Linear2", "Linear3")
HANDOFF = "handoff.json"  # in a run folder `handoff` or `adopt` wrote: the other code's epoch it starts from


def em_s_extra(step: float, t_end: float, interval: float) -> float:
    """Density above the target that the official ``--EM_S`` update at ``step`` leaves (any unit, e.g. steps
    or epochs): 0.05 while ``step <= 0.6 T_end``, 0.025 while ``step < T_end - interval``, then 0 (the final
    update; no update from ``T_end`` on, so it stays 0)."""
    return 0.05 if step <= 0.6 * t_end else 0.025 if step < t_end - interval else 0.0


def official_state(state: dict, *, epochs: int, seed: int) -> dict:
    """An official-code checkpoint (the ``official`` command's format) holding an edgetune run's state.

    ``state`` is an edgetune checkpoint's state (``CheckpointManager.load(path).state``) of
    ``sparse/fmnist-mlp-1pct-official`` saved at the end of an epoch. The sparse layers' links become the
    official dense weights and masks (``(out, in)``), their SGD momentum the dense momentum buffers (0 off the
    links, as the official code keeps them); biases, head and their momentum are copied. The scheduler state
    follows the official EM_S rule at the saved step: ``S`` (sparsity of the density in effect), ``step`` and
    the updates done, so the official code's next update (if any) is the one edgetune would make next.
    """
    model, loop = state["model"], state["loop"]
    sparse = state["callbacks"]["0:sparse"]
    shapes = [(int(o), int(i)) for _, o, i in sparse["layers"]]
    if len(shapes) != 3 or loop["batch"] != 0 or loop["epoch"] < 1:
        raise SystemExit(
            "handoff needs a checkpoint of the 3-sparse-layer MLP saved at the end of an epoch "
            f"(got {len(shapes)} sparse layers, {loop['batch']} batches into epoch {loop['epoch']})"
        )
    steps_per_epoch = loop["step"] // loop["epoch"]
    t_end = 0.75 * epochs * steps_per_epoch  # the official --EM_S T_end, in steps
    step = int(loop["step"])
    dense_allocation = 1 - (1 - float(sparse["density"]))  # as run.py computes it: 1 - args.sparsity
    extra = em_s_extra(step, t_end, steps_per_epoch)
    moms = state["optimizer"]["state"]
    out_model, out_moms, masks = {}, {}, []
    for n, (name, (o, i)) in enumerate(zip(_OFFICIAL_LAYERS, shapes)):
        rows, cols = model[f"layers.{n}.indices"].long()
        dense = torch.zeros(o, i)
        dense[rows, cols] = model[f"layers.{n}.values"].float()
        mom = torch.zeros(o, i)
        mom[rows, cols] = moms[2 * n]["momentum_buffer"].float()
        mask = torch.zeros(o, i, dtype=torch.bool)
        mask[rows, cols] = True
        masks.append(mask)
        out_model[f"{name}.weight"], out_model[f"{name}.bias"] = dense, model[f"layers.{n}.bias"].float()
        out_moms[2 * n], out_moms[2 * n + 1] = mom, moms[2 * n + 1]["momentum_buffer"].float()
    out_model["last_layer.weight"], out_model["last_layer.bias"] = model["head.weight"], model["head.bias"]
    out_moms[6], out_moms[7] = moms[6]["momentum_buffer"], moms[7]["momentum_buffer"]
    group = dict(state["optimizer"]["param_groups"][0], params=list(range(8)))  # lr: the official schedule's
    return {
        "next_epoch": int(loop["epoch"]),
        "model": out_model,
        "optimizer": {
            "state": {k: {"momentum_buffer": v} for k, v in out_moms.items()},
            "param_groups": [group],
        },
        "pruner": {
            "dense_allocation": dense_allocation,
            "S": [1 - dense_allocation - extra] * 3,
            "N": [o * i for o, i in shapes],
            "hyperparams": {
                "delta_T": steps_per_epoch,
                "alpha": 0.3,
                "T_end": t_end,
                "ignore_linear_layers": False,
                "static_topo": False,
                "sparsity_distribution": "uniform",
                "grad_accumulation_n": 1,
            },
            "step": step,
            "dst_steps": int(sparse["updates"]),
            "backward_masks": masks,
            "_linear_layers_mask": [1, 1, 1],
        },
        "torch_rng": torch.Generator().manual_seed(seed).get_state(),
        "np_rng": np.random.RandomState(seed).get_state(),
        "py_rng": random.Random(seed).getstate(),
    }


def _handoff(args: argparse.Namespace) -> None:
    from edgetune.core.config import load_yaml
    from edgetune.sparse.bench.quality_plot import read_curves
    from edgetune.train.checkpoint import CheckpointManager

    ck = CheckpointManager.load(args.checkpoint)
    run = Path(args.checkpoint).resolve().parents[1]  # the edgetune run folder
    if (run / "config.yaml").exists() and (
        planned := load_yaml(run / "config.yaml")["train"]["epochs"]
    ) != args.epochs:
        raise SystemExit(
            f"{run} was planned for {planned} epochs, not --epochs {args.epochs}: both codes' schedules follow it"
        )
    state = official_state(ck.state, epochs=args.epochs, seed=args.seed)
    if state["next_epoch"] >= args.epochs:
        raise SystemExit(
            f"the checkpoint is at epoch {state['next_epoch']} of {args.epochs}: nothing left to continue"
        )
    run_dir = Path(args.work).expanduser().resolve() / f"e{args.epochs}-s{args.seed}"
    if (run_dir / "checkpoint.pt").exists():
        raise SystemExit(f"{run_dir} already holds an official run: give another --work or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run / "metrics.jsonl"
    accs = [a for _, a in read_curves(metrics)[0]][: state["next_epoch"]] if metrics.exists() else []
    if len(accs) != state["next_epoch"]:
        raise SystemExit(f"{metrics} lacks the test accuracy of the {state['next_epoch']} epochs trained")
    torch.save(state, run_dir / "checkpoint.pt")
    (run_dir / "epochs.json").write_text(json.dumps(accs))
    (run_dir / "log.txt").write_text(f"handoff from edgetune checkpoint {Path(args.checkpoint).resolve()}\n")
    marker = {"checkpoint": str(Path(args.checkpoint).resolve()), "epoch": state["next_epoch"]}
    (run_dir / HANDOFF).write_text(json.dumps(marker))
    print(
        f"{run_dir}: edgetune's state after epoch {state['next_epoch']}; continue it in the official code with "
        f"`compare_official_cht.py official --src SRC --epochs {args.epochs} --seed {args.seed} --work {args.work}`"
    )


def edgetune_state(official: dict, template: dict) -> dict:
    """An edgetune checkpoint state holding an official run's state: the reverse of :func:`official_state`.

    ``official`` is a checkpoint of the ``official`` command (saved at an epoch's end); ``template`` an edgetune
    checkpoint state of ``sparse/fmnist-mlp-1pct-official`` at the end of the same epoch, planned for the same
    epochs. The sparse layers' links, weights and momentum, the biases and the head (and their momentum) become
    the official run's; the loop position, learning-rate schedule, random streams and method state stay the
    template's, so edgetune continues with its own data order from the official code's network.
    """
    import copy

    state = copy.deepcopy(template)
    loop, sparse = state["loop"], state["callbacks"]["0:sparse"]
    shapes = [(int(o), int(i)) for _, o, i in sparse["layers"]]
    if len(shapes) != 3 or loop["batch"] != 0 or int(loop["epoch"]) != int(official["next_epoch"]):
        raise SystemExit(
            f"the template must be edgetune's checkpoint of the 3-sparse-layer MLP at the end of epoch "
            f"{official['next_epoch']} (the official checkpoint's); got {len(shapes)} sparse layers, "
            f"{loop['batch']} batches into epoch {loop['epoch']}"
        )
    if int(official["pruner"]["dst_steps"]) != int(sparse["updates"]):
        raise SystemExit(
            f"the official run made {official['pruner']['dst_steps']} topology updates by epoch "
            f"{official['next_epoch']}, the template {sparse['updates']}: both codes must stand at the same "
            "point of the EM_S schedule"
        )
    model, moms = state["model"], state["optimizer"]["state"]
    src, src_moms = official["model"], official["optimizer"]["state"]
    for n, (name, (o, i)) in enumerate(zip(_OFFICIAL_LAYERS, shapes)):
        mask = official["pruner"]["backward_masks"][n].bool()
        if tuple(mask.shape) != (o, i):
            raise SystemExit(f"official layer {name} is {tuple(mask.shape)}, edgetune's layers.{n} {(o, i)}")
        idx = mask.nonzero().t()  # row-major, the layer's order
        rows, cols = idx
        model[f"layers.{n}.indices"] = idx.to(model[f"layers.{n}.indices"].dtype)
        model[f"layers.{n}.values"] = src[f"{name}.weight"][rows, cols].float().clone()
        model[f"layers.{n}.bias"] = src[f"{name}.bias"].float().clone()
        moms[2 * n]["momentum_buffer"] = src_moms[2 * n]["momentum_buffer"][rows, cols].float().clone()
        moms[2 * n + 1]["momentum_buffer"] = src_moms[2 * n + 1]["momentum_buffer"].float().clone()
    model["head.weight"], model["head.bias"] = (
        src["last_layer.weight"].clone(),
        src["last_layer.bias"].clone(),
    )
    moms[6]["momentum_buffer"] = src_moms[6]["momentum_buffer"].clone()
    moms[7]["momentum_buffer"] = src_moms[7]["momentum_buffer"].clone()
    state["window"] = {}  # the template's training statistics since its last record are edgetune's, not these
    return state


def _adopt(args: argparse.Namespace) -> None:
    from edgetune.core.config import load_yaml
    from edgetune.core.errors import CheckpointError
    from edgetune.train.checkpoint import CheckpointManager

    official_dir = Path(args.official).expanduser().resolve()
    m = re.fullmatch(r"e(\d+)-s(\d+)", official_dir.name)
    if not m:
        raise SystemExit(
            f"--official {official_dir} is not a run folder of the `official` command (e<epochs>-s<seed>)"
        )
    planned = int(m[1])
    ck_path = Path(args.checkpoint) if args.checkpoint else official_dir / "checkpoint.pt"
    if not ck_path.is_file():
        raise SystemExit(
            f"no official checkpoint {ck_path}: give --checkpoint, a copy kept at the epoch wanted"
        )
    official = torch.load(ck_path, map_location="cpu", weights_only=False)
    k = int(official["next_epoch"])
    accs = official_accuracies(official_dir)[:k]
    if len(accs) != k:
        raise SystemExit(
            f"{official_dir} lacks the test accuracy of the {k} epochs its checkpoint has trained"
        )
    try:
        tpl = CheckpointManager.load(args.template)
    except CheckpointError as err:
        raise SystemExit(f"--template: {err}") from None
    tpl_run = Path(args.template).resolve().parents[1]
    if not (tpl_run / "config.yaml").is_file() or not (tpl_run / "metrics.jsonl").is_file():
        raise SystemExit(
            f"{tpl_run} is not an edgetune run folder (config.yaml, metrics.jsonl): the template's run"
        )
    cfg_text = (tpl_run / "config.yaml").read_text()
    if (tpl_epochs := load_yaml(tpl_run / "config.yaml")["train"]["epochs"]) != planned:
        raise SystemExit(f"{tpl_run} was planned for {tpl_epochs} epochs, the official run for {planned}")
    state = edgetune_state(official, tpl.state)
    out = Path(args.out).expanduser().resolve()
    if out.exists():
        raise SystemExit(f"{out} exists: give a new folder")
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text(cfg_text)
    # the records written before the checkpoint (the loop truncates to them on resume), with the official
    # run's test accuracies for the epochs it trained
    rows = [json.loads(x) for x in (tpl_run / "metrics.jsonl").read_text().splitlines()][
        : state["loop"]["records"]
    ]
    for r in rows:
        if r.get("kind") == "eval" and r.get("split") == "test" and "acc" in r and r.get("epoch", k + 1) <= k:
            r["acc"] = accs[int(r["epoch"]) - 1]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    CheckpointManager(out / "checkpoints").save(tpl.step, state, tpl.fingerprint)
    (out / HANDOFF).write_text(json.dumps({"checkpoint": str(ck_path.resolve()), "epoch": k}))
    print(f"{out}: the official run's state after epoch {k}; continue it with `edgetune run --resume {out}`")


def handoff_epoch(run_dir: Path) -> int | None:
    """The epoch after which a run continues the other code's state (None: the code's own run from the start)."""
    marker = run_dir / HANDOFF
    return int(json.loads(marker.read_text())["epoch"]) if marker.exists() else None


def _handoff_lines(
    sides: dict[str, dict[int, list[float]]], dirs: dict[str, dict[int, Path]], n: int
) -> list[str]:
    """Paired figures of runs that continue the other code's state after epoch K (``handoff``: the official code
    from edgetune's, ``adopt``: edgetune from the official code's): the mean over epochs K+1 to n of that run and
    of the run the state came from (before K the two are equal by construction)."""
    rows = []
    for code, other in (("official", "edgetune"), ("edgetune", "official")):
        for s, d in sorted(dirs.get(code, {}).items()):
            if (k := handoff_epoch(d)) is None or k >= n:
                continue
            means = {c: statistics.mean(sides[c][s][k:n]) for c in (code, other) if s in sides.get(c, {})}
            cells = [f"{means[c]:.4f}" if c in means else "–" for c in ("official", "edgetune")]
            diff = f"{(means['edgetune'] - means['official']) * 100:+.2f}" if len(means) == 2 else "–"
            rows.append(f"| {code} from {other}'s | {s} | {k} | {' | '.join(cells)} | {diff} |")
    if not rows:
        return []
    return [
        "",
        (
            "Paired runs: one code continues the other's state after epoch K (`handoff`, `adopt`); its epochs 1-K "
            f"are the other code's. Mean test accuracy over epochs K+1 to {n}, each code from the same state:"
        ),
        "",
        "| state | seed | K | official | edgetune | edgetune minus official (points) |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def official_accuracies(run_dir: Path) -> list[float]:
    """Per-epoch test accuracy (fraction) of an official run: ``epochs.json`` written after each epoch, or
    the ``Prec@1`` lines (percent) of its log."""
    if (run_dir / "epochs.json").exists():
        return [float(a) for a in json.loads((run_dir / "epochs.json").read_text())]
    text = (run_dir / "log.txt").read_text(errors="replace")
    return [float(m) / 100 for m in re.findall(r"Prec@1 ([0-9.]+)", text)]


def _seed(name: str) -> int:
    return int(re.findall(r"-s(\d+)", name)[-1])


def _edgetune_runs(folder: Path) -> tuple[dict[int, list[float]], dict[int, float]]:
    """Per seed: the test accuracy of every epoch and the active-neuron fraction at the end."""
    from edgetune.sparse.bench.quality_plot import read_curves

    accs: dict[int, list[float]] = {}
    active: dict[int, float] = {}
    for f in sorted(folder.glob("*/metrics.jsonl")):
        acc, act = read_curves(f)
        accs[_seed(f.parent.name)] = [a for _, a in acc]
        if act:
            active[_seed(f.parent.name)] = act[-1][1]
    return accs, active


def _active(masks: list[torch.Tensor]) -> float:
    """edgetune's count on the official masks ``(out, in)``: the three sparse layers chained, the last one
    feeding the dense head."""
    from edgetune.sparse.percolation import active_neuron_fraction

    return active_neuron_fraction(masks, [[0, 1, 2]], [2])


def _official_active(run_dir: Path) -> float | None:
    """From the last checkpoint's masks, else from the weights of the official ``best_model.pth`` (epoch > 75%,
    the topology final; pruned weights are exactly 0)."""
    if (run_dir / "checkpoint.pt").exists():
        ck = torch.load(run_dir / "checkpoint.pt", weights_only=False)
        return _active([m.bool() for m in ck["pruner"]["backward_masks"]])
    best = sorted(run_dir.glob("**/best_model.pth"))
    if not best:
        return None
    sd = torch.load(best[0], map_location="cpu", weights_only=True)
    return _active([sd[f"Linear{i}.weight"] != 0 for i in (1, 2, 3)])


def _stats(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


_CODE_NAMES = {"official": "official code", "edgetune": "edgetune"}


def _codes(sides: dict[str, dict[int, list[float]]]) -> str:
    return " vs ".join(_CODE_NAMES[c] for c in sides)


def em_s_phases(total: int) -> list[tuple[str, int, int]]:
    """The EM_S density phases of a ``total``-epoch run as ``(density, first, last)`` 1-based epochs.

    The official scheduler (``--EM_S``, one update an epoch, ``T_end`` = 75% of the epochs) sets the density the
    next epoch trains at in the update at the end of epoch ``u``: 6% while ``u <= 0.6 T_end``, 3.5% while
    ``u < T_end - 1``, then 1% for good (no update from ``T_end`` on); epoch 1 trains at the initial 6%.
    """

    label = {0.05: "6%", 0.025: "3.5%", 0.0: "1%"}
    phases: list[tuple[str, int, int]] = []
    for e in range(1, total + 1):
        d = label[em_s_extra(e - 1, 0.75 * total, 1)]
        if phases and phases[-1][0] == d:
            phases[-1] = (d, phases[-1][1], e)
        else:
            phases.append((d, e, e))
    return phases


def _phase_lines(sides: dict[str, dict[int, list[float]]], total: int, n: int) -> list[str]:
    """Mean accuracy over each EM_S phase's epochs (mean ± std over seeds): where two codes part."""
    phases = [(d, a, min(b, n)) for d, a, b in em_s_phases(total) if a <= n]
    head = " | ".join(f"{d} (epochs {a}-{b})" for d, a, b in phases)
    lines = [
        "",
        "Mean test accuracy over each EM_S density phase:",
        "",
        f"| code | {head} |",
        "|---|" + "---|" * len(phases),
    ]
    for code, runs in sides.items():
        cells = [_stats([sum(r[a - 1 : b]) / (b - a + 1) for r in runs.values()]) for _, a, b in phases]
        lines.append(f"| {code} | {' | '.join(cells)} |")
    return lines


def _report(args: argparse.Namespace) -> None:
    runs = {  # the folders the `official` command makes: e<epochs>-s<seed> -> (planned epochs, seed)
        d: (int(m[1]), int(m[2]))
        for d in sorted(Path(args.official).glob("e*-s*"))
        if (m := re.fullmatch(r"e(\d+)-s(\d+)", d.name)) and (d / "log.txt").exists()
    }
    official_dirs = {seed: d for d, (_, seed) in runs.items()}
    official = {seed: official_accuracies(d) for seed, d in official_dirs.items()}
    if not official:
        raise SystemExit(f"no official runs (e<epochs>-s<seed>/log.txt) under {args.official}")
    planned = {epochs for epochs, _ in runs.values()}
    if len(planned) != 1:
        raise SystemExit(
            f"official runs planned for different epochs {sorted(planned)}: report one length at a time"
        )
    total = planned.pop()
    for seed, d in official_dirs.items():
        if len(official[seed]) != total and not args.partial:
            raise SystemExit(
                f"official run {d} has {len(official[seed])} of its {total} epochs: finish it (the same "
                "`official` command resumes it), remove it, or pass --partial to report the epochs done"
            )
    sides = {"official": official}
    edgetune_active: dict[int, float] = {}
    edgetune_dirs: dict[int, Path] = {}
    if args.edgetune:  # without it, the official runs alone
        sides["edgetune"], edgetune_active = _edgetune_runs(Path(args.edgetune))
        edgetune_dirs = {
            _seed(f.parent.name): f.parent for f in sorted(Path(args.edgetune).glob("*/metrics.jsonl"))
        }
    if args.partial:  # every run cut to the epochs the least advanced official run has done
        done = min(len(a) for a in official.values())
        if any(len(a) > done for a in sides.get("edgetune", {}).values()):
            edgetune_active = {}  # counted at the end of edgetune's runs, not at the epoch they are cut to
        sides = {c: {s: a[:done] for s, a in runs.items()} for c, runs in sides.items()}
        official = sides["official"]
    epochs = {len(a) for runs in sides.values() for a in runs.values()}
    if len(epochs) != 1:
        raise SystemExit(
            f"runs of unequal length (epochs {sorted(epochs)}); finish or remove the partial ones"
        )
    n = epochs.pop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["code", "seed", "epoch", "test_acc"])
        for code, runs in sides.items():
            for seed, accs in sorted(runs.items()):
                w.writerows([code, seed, e + 1, a] for e, a in enumerate(accs))
    # the official script's best-model rule (0-based epochs), on the planned schedule
    late = [e for e in range(n) if e > 0.75 * total]
    unfinished = f" (unfinished: epochs 1-{n} of {total})" if n < total else ""
    lines = [
        f"# CHTs, {_codes(sides)}, Fashion-MNIST, {total} epochs{unfinished}, 1% density",
        "",
        (
            "Made by `scripts/compare_official_cht.py` (its docstring has the commands); per-epoch accuracies in "
            "the CSV beside this file."
        ),
        "",
        "| code | seeds | last epoch | best epoch after 75% | mean over all epochs | active neurons at the end |",
        "|---|---|---|---|---|---|",
    ]
    active = {
        "official": {s: a for s, d in official_dirs.items() if (a := _official_active(d)) is not None},
        "edgetune": edgetune_active,
    }
    for code, runs in sides.items():
        accs = [runs[s] for s in sorted(runs)]
        lines.append(
            f"| {code} | {', '.join(map(str, sorted(runs)))} | {_stats([a[-1] for a in accs])} | "
            f"{_stats([max(a[e] for e in late) for a in accs] if late else [])} | {_stats([sum(a) / n for a in accs])} | "
            f"{_stats(list(active[code].values()))} |"
        )
    lines += _phase_lines(sides, total, n)
    lines += _handoff_lines(sides, {"official": official_dirs, "edgetune": edgetune_dirs}, n)
    if common := sorted(set(official) & set(sides.get("edgetune", {}))):
        diffs = [
            sum(sides["edgetune"][s][e] - official[s][e] for s in common) / len(common) for e in range(n)
        ]
        lines += [
            "",
            "edgetune minus official, mean over the seeds, epoch by epoch: "
            + ", ".join(f"{d * 100:+.2f}" for d in diffs)
            + " points.",
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(sides, n, out.with_suffix(".png"))
    print("\n".join(lines))


def _plot(sides: dict[str, dict[int, list[float]]], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (code, runs), colour in zip(sides.items(), ("tab:orange", "tab:blue")):
        for i, (seed, accs) in enumerate(sorted(runs.items())):
            ax.plot(
                range(1, n + 1),
                accs,
                color=colour,
                alpha=0.8,
                lw=1,
                label=code if i == 0 else None,
                ls=("-", "--", ":")[i % 3],
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.8, 0.92)
    ax.set_title(f"CHTs 1% (Fashion-MNIST MLP): {_codes(sides)}, one line a seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("official", help="run the official code's CHTs command for one seed")
    o.add_argument(
        "--src", required=True, help="checkout of Cannistraci-Hebb-training (holds setup.py, mlp_and_cnn/)"
    )
    o.add_argument("--epochs", type=int, default=20)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads")
    o.add_argument("--work", default="/tmp/cht-official")
    o.add_argument(
        "--data", default="/usr/share/datasets/fashion-mnist", help="folder of the Fashion-MNIST IDX files"
    )
    r = sub.add_parser("report", help="compare finished runs of both codes")
    r.add_argument("--official", default="/tmp/cht-official")
    r.add_argument("--edgetune", help="the bench suite's --work-dir; left out, the official runs alone")
    r.add_argument("--out", default="bench/results/sparse-official-side-by-side")
    r.add_argument(
        "--partial",
        action="store_true",
        help=(
            "report official runs that have not finished their epochs, every run cut to the epochs the least "
            "advanced one has done (the title says so; 'last' is the last done)"
        ),
    )
    h = sub.add_parser(
        "handoff",
        help="write edgetune's state at an epoch's end as an official run the `official` command continues",
    )
    h.add_argument(
        "--checkpoint", required=True, help="an edgetune checkpoint (.json) of the official-settings recipe"
    )
    h.add_argument("--epochs", type=int, default=100, help="the run's planned epochs (both codes' schedules)")
    h.add_argument(
        "--seed", type=int, default=0, help="seeds the official code's random streams from here on"
    )
    h.add_argument("--work", default="/tmp/cht-handoff")
    ad = sub.add_parser(
        "adopt",
        help="write an official run's state at an epoch's end as an edgetune run folder `edgetune run --resume` continues",
    )
    ad.add_argument("--official", required=True, help="the official run folder (e<epochs>-s<seed>)")
    ad.add_argument(
        "--checkpoint", help="an official checkpoint kept from that run (default: its checkpoint.pt)"
    )
    ad.add_argument(
        "--template",
        required=True,
        help="edgetune's checkpoint (.json) of the official-settings recipe at the end of the same epoch",
    )
    ad.add_argument("--out", required=True, help="the new edgetune run folder (name it <anything>-s<seed>)")
    a = p.parse_args()
    {"official": _official, "report": _report, "handoff": _handoff, "adopt": _adopt}[a.cmd](a)


if __name__ == "__main__":
    main()
