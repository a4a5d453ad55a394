"""scripts/compare_official_cht.py: its stand-ins for torchvision read and transform as torchvision does, and its
report reads both codes' runs (a resumed official run from its epochs.json) and applies the official best-epoch
rule."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "compare_official_cht.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compare_official_cht", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _idx(path: Path, arr: np.ndarray) -> None:
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def test_torchvision_stand_in_reads_idx_and_normalises_like_torchvision(
    script: ModuleType, tmp_path: Path
) -> None:
    shims = tmp_path / "shims"
    for name, text in script.SHIMS.items():
        (shims / name).parent.mkdir(parents=True, exist_ok=True)
        (shims / name).write_text(text)
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    for split in ("train", "t10k"):
        _idx(tmp_path / f"{split}-images-idx3-ubyte.gz", imgs)
        _idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    code = (
        "import json, sys; from torchvision import datasets, transforms as T\n"
        "ds = datasets.FashionMNIST(root='x', train=False, download=True,"
        " transform=T.Compose([T.ToTensor(), T.Normalize((0.2860,), (0.3530,))]))\n"
        "x, y = ds[3]; print(json.dumps([len(ds), list(x.shape), str(x.dtype), x[0, 4, 7].item(), y]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(shims), "CHT_FMNIST_DIR": str(tmp_path), "PATH": ""},
    )
    n, shape, dtype, value, label = json.loads(out.stdout)
    assert (n, shape, dtype, label) == (5, [1, 28, 28], "torch.float32", int(labels[3]))
    expected = (np.float32(imgs[3, 4, 7]) / np.float32(255) - np.float32(0.2860)) / np.float32(0.3530)
    assert value == pytest.approx(float(expected), abs=1e-6)


def test_report_compares_last_and_official_best_epochs(script: ModuleType, tmp_path: Path) -> None:
    official, edgetune = tmp_path / "official", tmp_path / "edgetune"
    # 8 epochs: the official rule keeps the best of 0-based epochs > 6, i.e. only the last one (index 7)
    runs = {0: [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.85], 1: [0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9, 0.87]}
    for seed, accs in runs.items():
        d = official / f"e8-s{seed}"
        d.mkdir(parents=True)
        lines = [
            f"Train Epoch: {e}\nTest:\tTime 0.01\tLoss 0.5\tPrec@1 {a * 100:.3f}\tPrec@5 99.0"
            for e, a in enumerate(accs)
        ]
        (d / "log.txt").write_text("\n".join(lines) + "\n")
        # seed 1 is a resumed run: its log repeats epochs, epochs.json holds one accuracy per trained epoch
        if seed == 1:
            (d / "log.txt").write_text("Prec@1 0.000\n" * 3 + "\n".join(lines) + "\n")
            (d / "epochs.json").write_text(json.dumps(accs))
        masks = [
            torch.ones(4, 3, dtype=torch.bool),
            torch.ones(4, 4, dtype=torch.bool),
            torch.ones(4, 4, dtype=torch.bool),
        ]
        if seed == 0:  # hidden neuron 0 of the first layer has no input: 11 of 12 hidden neurons carry signal
            masks[0][0] = False
            torch.save({"pruner": {"backward_masks": masks}}, d / "checkpoint.pt")
        else:  # the official best model: pruned weights are exactly 0
            (d / "mlp" / "x").mkdir(parents=True)
            torch.save(
                {f"Linear{i + 1}.weight": m.float() for i, m in enumerate(masks)},
                d / "mlp" / "x" / "best_model.pth",
            )
        e = edgetune / f"fmnist-mlp-1pct-official-e8-chts-s{seed}-abc"
        e.mkdir(parents=True)
        rows = [{"kind": "train", "acc": 0.1, "epoch": i + 1} for i in range(8)]
        rows += [
            {"kind": "eval", "split": "test", "acc": a + 0.01, "epoch": i + 1} for i, a in enumerate(accs)
        ]
        rows += [{"kind": "method", "sparse_active_neurons": 0.2 + 0.1 * seed, "epoch": 8}]
        (e / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "res" / "side"
    script._report(
        type(
            "A", (), {"official": str(official), "edgetune": str(edgetune), "out": str(out), "partial": False}
        )()
    )
    md = out.with_suffix(".md").read_text()
    assert "| official | 0, 1 | 0.8600 ± 0.0141 | 0.8600 ± 0.0141 | 0.7788 ± 0.0106 | 0.9583 ± 0.0589 |" in md
    assert "| edgetune | 0, 1 | 0.8700 ± 0.0141 | 0.8700 ± 0.0141 | 0.7888 ± 0.0106 | 0.2500 ± 0.0707 |" in md
    assert md.count("+1.00") == 8
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0] == "code,seed,epoch,test_acc" and len(rows) == 1 + 2 * 2 * 8
    assert out.with_suffix(".png").stat().st_size > 0


def _args(tmp_path: Path, edgetune: bool = True, partial: bool = False) -> object:
    return type(
        "A",
        (),
        {
            "official": str(tmp_path / "official"),
            "edgetune": str(tmp_path / "edgetune") if edgetune else None,
            "out": str(tmp_path / "o"),
            "partial": partial,
        },
    )()


def _official_log(tmp_path: Path, name: str, accs: list[float]) -> None:
    d = tmp_path / "official" / name
    d.mkdir(parents=True)
    (d / "log.txt").write_text("".join(f"Prec@1 {a * 100:.2f}\n" for a in accs))


def test_report_refuses_runs_of_unequal_length(script: ModuleType, tmp_path: Path) -> None:
    _official_log(tmp_path, "e2-s0", [0.5, 0.6])
    e = tmp_path / "edgetune" / "x-e8-chts-s0"
    e.mkdir(parents=True)
    (e / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "acc": 0.5}) + "\n")
    with pytest.raises(SystemExit, match="unequal length"):
        script._report(_args(tmp_path))


def test_report_refuses_an_unfinished_official_run(script: ModuleType, tmp_path: Path) -> None:
    # planned 8 epochs (the folder name), 3 done: its "last epoch" would not be the protocol's
    _official_log(tmp_path, "e8-s0", [0.5, 0.6, 0.7])
    with pytest.raises(SystemExit, match=r"has 3 of its 8 epochs.*resumes it.*--partial"):
        script._report(_args(tmp_path, edgetune=False))


def test_partial_report_keeps_the_planned_schedule(script: ModuleType, tmp_path: Path) -> None:
    # 12 epochs planned, 11 done: the best-model window stays 0-based epochs > 9 (of 12), so the 0.99 of epoch 9
    # is left out, as the finished run would leave it out
    _official_log(tmp_path, "e12-s0", [0.5] * 9 + [0.99, 0.85])
    with pytest.raises(SystemExit, match="of its 12 epochs"):
        script._report(_args(tmp_path, edgetune=False))
    script._report(_args(tmp_path, edgetune=False, partial=True))
    md = (tmp_path / "o.md").read_text()
    assert md.startswith("# CHTs, official code, Fashion-MNIST, 12 epochs (unfinished: epochs 1-11 of 12)")
    assert "| official | 0 | 0.8500 ± 0.0000 | 0.8500 ± 0.0000 |" in md
    # EM_S phases of 12 epochs: 6% epochs 1-6, 3.5% 7-8, 1% 9-12, cut at the 11 epochs done
    assert "| code | 6% (epochs 1-6) | 3.5% (epochs 7-8) | 1% (epochs 9-11) |" in md
    assert "| official | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 | 0.7800 ± 0.0000 |" in md


def test_partial_report_cuts_every_run_to_the_official_epochs_done(
    script: ModuleType, tmp_path: Path
) -> None:
    _official_log(tmp_path, "e12-s1", [0.5] * 7)  # 7 of 12 epochs done
    e = tmp_path / "edgetune" / "x-e12-chts-s1"
    e.mkdir(parents=True)
    rows = [{"kind": "eval", "split": "test", "epoch": i + 1, "acc": 0.6} for i in range(12)]
    rows.append({"kind": "method", "sparse_active_neurons": 0.3, "epoch": 12})
    (e / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(SystemExit, match="of its 12 epochs"):
        script._report(_args(tmp_path))
    script._report(_args(tmp_path, partial=True))
    md = (tmp_path / "o.md").read_text()
    assert "(unfinished: epochs 1-7 of 12)" in md
    assert "| edgetune | 1 | 0.6000 ± 0.0000 | – | 0.6000 ± 0.0000 | – |" in md  # no end-of-run neuron count
    assert md.count("+10.00") == 7  # epoch by epoch, the 7 epochs both have
    assert len((tmp_path / "o.csv").read_text().splitlines()) == 1 + 2 * 7


@pytest.mark.parametrize("total", [8, 12, 20, 100])
def test_em_s_phases_follow_the_official_scheduler(script: ModuleType, total: int) -> None:
    # the official DSTScheduler at step granularity: an update every delta steps while step < T_end, the
    # density it sets by step <= 0.6 T_end / step < T_end - delta / final (mlp_and_cnn/dst_scheduler.py)
    delta = 7  # steps an epoch
    t_end = total * 0.75 * delta
    density, per_epoch = "6%", []
    for step in range(1, total * delta + 1):
        if (step - 1) % delta == 0:
            per_epoch.append(density)  # what the epoch starting here trains at
        if step % delta == 0 and step < t_end:
            density = "6%" if step <= t_end * 0.6 else "3.5%" if step < t_end - delta else "1%"
    got = [d for d, a, b in script.em_s_phases(total) for _ in range(a, b + 1)]
    assert got == per_epoch


def test_report_of_the_official_runs_alone(script: ModuleType, tmp_path: Path) -> None:
    _official_log(tmp_path, "e5-s0", [0.5, 0.6, 0.9, 0.8, 0.85])  # best of 0-based epochs > 3.75: the last
    _official_log(tmp_path, "e5-s1", [0.5, 0.6, 0.7, 0.7, 0.75])
    script._report(_args(tmp_path, edgetune=False))
    md = (tmp_path / "o.md").read_text()
    assert md.startswith("# CHTs, official code, Fashion-MNIST, 5 epochs")
    assert "| official | 0, 1 | 0.8000 ± 0.0707 | 0.8000 ± 0.0707 | 0.6900 ± 0.0566 | – |" in md
    assert "edgetune" not in md.split("\n", 1)[0] and "minus official" not in md
    assert len((tmp_path / "o.csv").read_text().splitlines()) == 1 + 2 * 5


def test_report_pairs_a_handoff_run_with_edgetune_after_the_handoff(
    script: ModuleType, tmp_path: Path
) -> None:
    # seed 1 continues edgetune's state after epoch 3: its epochs 1-3 are edgetune's, 4-5 the official code's
    _official_log(tmp_path, "e5-s1", [0.5, 0.6, 0.7, 0.80, 0.84])
    (tmp_path / "official" / "e5-s1" / script.HANDOFF).write_text(json.dumps({"checkpoint": "c", "epoch": 3}))
    _official_log(tmp_path, "e5-s0", [0.5, 0.6, 0.7, 0.7, 0.7])  # the official code's own run: no pairing
    for seed, accs in {0: [0.5] * 5, 1: [0.5, 0.6, 0.7, 0.83, 0.85]}.items():
        e = tmp_path / "edgetune" / f"x-e5-chts-s{seed}"
        e.mkdir(parents=True)
        rows = [{"kind": "eval", "split": "test", "acc": a, "epoch": i + 1} for i, a in enumerate(accs)]
        (e / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    script._report(_args(tmp_path))
    md = (tmp_path / "o.md").read_text()
    assert "Mean test accuracy over epochs K+1 to 5" in md
    assert "| official from edgetune's | 1 | 3 | 0.8200 | 0.8400 | +2.00 |" in md
    assert "| 0 |" not in md.split("Paired runs")[1]
    # a handoff run whose edgetune run is not in the report: its own mean, no pair
    (tmp_path / "edgetune" / "x-e5-chts-s1" / "metrics.jsonl").rename(tmp_path / "gone.jsonl")
    script._report(_args(tmp_path))
    assert "| official from edgetune's | 1 | 3 | 0.8200 | – | – |" in (tmp_path / "o.md").read_text()
    assert script.handoff_epoch(tmp_path / "official" / "e5-s0") is None


def _edgetune_state(epoch: int, batch: int = 0, spe: int = 10) -> dict:
    """An edgetune checkpoint state of a 3-sparse-layer MLP (3 -> 4 -> 4 -> 4, head 4 -> 2)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (4, 4), (4, 4)]
    model, moms = {}, {}
    for n, (o, i) in enumerate(shapes):
        links = torch.randperm(o * i, generator=g)[: o + 1].sort().values
        model[f"layers.{n}.indices"] = torch.stack([links // i, links % i]).int()
        model[f"layers.{n}.values"] = torch.randn(o + 1, generator=g)
        model[f"layers.{n}.bias"] = torch.randn(o, generator=g)
        moms[2 * n] = {"momentum_buffer": torch.randn(o + 1, generator=g)}
        moms[2 * n + 1] = {"momentum_buffer": torch.randn(o, generator=g)}
    model["head.weight"], model["head.bias"] = torch.randn(2, 4, generator=g), torch.randn(2, generator=g)
    moms[6], moms[7] = (
        {"momentum_buffer": torch.randn(2, 4, generator=g)},
        {"momentum_buffer": torch.randn(2, generator=g)},
    )
    group = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "initial_lr": 0.025, "params": list(range(8))}
    return {
        "model": model,
        "optimizer": {"state": moms, "param_groups": [group]},
        "loop": {"step": epoch * spe + batch, "epoch": epoch, "batch": batch},
        "window": {"loss": torch.tensor(3.5, dtype=torch.float64), "n": torch.tensor(7)},
        "callbacks": {
            "0:sparse": {
                "density": 0.01,
                "updates": epoch,
                "layers": [[f"layers.{n}", o, i] for n, (o, i) in enumerate(shapes)],
            }
        },
    }


def test_handoff_state_is_edgetunes_run_in_the_official_layout(script: ModuleType) -> None:
    state = _edgetune_state(epoch=5)
    ck = script.official_state(state, epochs=20, seed=3)
    assert ck["next_epoch"] == 5
    for n, name in enumerate(("Linear1", "Linear2", "Linear3")):
        rows, cols = state["model"][f"layers.{n}.indices"].long()
        w, mask = ck["model"][f"{name}.weight"], ck["pruner"]["backward_masks"][n]
        assert torch.equal(w[rows, cols], state["model"][f"layers.{n}.values"])
        assert int(mask.sum()) == rows.numel() and bool(mask[rows, cols].all()) and not bool(w[~mask].any())
        mom = ck["optimizer"]["state"][2 * n]["momentum_buffer"]
        assert torch.equal(mom[rows, cols], state["optimizer"]["state"][2 * n]["momentum_buffer"])
        assert not bool(mom[~mask].any())  # the official code keeps momentum at 0 off the links
        assert torch.equal(ck["model"][f"{name}.bias"], state["model"][f"layers.{n}.bias"])
    assert torch.equal(ck["model"]["last_layer.weight"], state["model"]["head.weight"])
    assert torch.equal(
        ck["optimizer"]["state"][7]["momentum_buffer"], state["optimizer"]["state"][7]["momentum_buffer"]
    )
    p = ck["pruner"]
    assert (p["step"], p["dst_steps"], p["N"]) == (50, 5, [12, 16, 16])
    assert p["hyperparams"]["T_end"] == 0.75 * 20 * 10 and p["hyperparams"]["delta_T"] == 10
    assert ck["optimizer"]["param_groups"][0]["params"] == list(range(8))


@pytest.mark.parametrize(("epoch", "extra"), [(9, 0.05), (10, 0.025), (13, 0.025), (14, 0.0), (18, 0.0)])
def test_handoff_sparsity_follows_em_s_at_the_saved_step(
    script: ModuleType, epoch: int, extra: float
) -> None:
    # 20 epochs of 10 steps: T_end 150, 6% while step <= 90, 3.5% while step < 140, then the final 1%
    p = script.official_state(_edgetune_state(epoch=epoch), epochs=20, seed=0)["pruner"]
    assert p["S"] == [1 - p["dense_allocation"] - extra] * 3
    assert p["dense_allocation"] == 1 - 0.99  # as run.py computes it from --sparsity


def test_handoff_refuses_a_checkpoint_inside_an_epoch(script: ModuleType) -> None:
    with pytest.raises(SystemExit, match="end of an epoch"):
        script.official_state(_edgetune_state(epoch=5, batch=3), epochs=20, seed=0)


def test_handoff_writes_an_official_run_folder(script: ModuleType, tmp_path: Path) -> None:
    from edgetune.train.checkpoint import CheckpointManager

    run = tmp_path / "run"
    path = CheckpointManager(run / "checkpoints").save(30, _edgetune_state(epoch=3), {})
    rows = [{"kind": "eval", "split": "test", "epoch": e + 1, "acc": 0.5 + e / 10} for e in range(4)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = type("A", (), {"checkpoint": str(path), "epochs": 20, "seed": 1, "work": str(tmp_path / "w")})()
    script._handoff(args)
    out = tmp_path / "w" / "e20-s1"
    assert json.loads((out / "epochs.json").read_text()) == [
        0.5,
        0.6,
        0.7,
    ]  # the epochs the state has trained
    assert torch.load(out / "checkpoint.pt", weights_only=False)["next_epoch"] == 3
    assert script.handoff_epoch(out) == 3  # the report pairs the epochs after it
    with pytest.raises(SystemExit, match="already holds an official run"):
        script._handoff(args)


def test_handoff_refuses_another_schedule_or_a_finished_run(script: ModuleType, tmp_path: Path) -> None:
    from edgetune.train.checkpoint import CheckpointManager

    run = tmp_path / "run"
    path = CheckpointManager(run / "checkpoints").save(200, _edgetune_state(epoch=20), {})
    (run / "metrics.jsonl").write_text("")

    def args(epochs: int) -> object:
        return type(
            "A", (), {"checkpoint": str(path), "epochs": epochs, "seed": 0, "work": str(tmp_path / "w")}
        )()

    with pytest.raises(SystemExit, match="nothing left to continue"):
        script._handoff(args(20))
    (run / "config.yaml").write_text("train:\n  epochs: 30\n")
    with pytest.raises(SystemExit, match="planned for 30 epochs, not --epochs 40"):
        script._handoff(args(40))


def _official_ck(script: ModuleType, epoch: int) -> dict:
    """An official checkpoint whose network differs from the template's: another edgetune state converted."""
    other = _edgetune_state(epoch=epoch)
    for n in range(3):  # another topology and other weights
        other["model"][f"layers.{n}.indices"] = torch.stack([torch.arange(4), torch.arange(4) % 3]).int()
        other["model"][f"layers.{n}.values"] = torch.full((4,), 0.5 + n)
        other["optimizer"]["state"][2 * n]["momentum_buffer"] = torch.full((4,), -1.0 - n)
    return script.official_state(other, epochs=20, seed=0)


def test_adopt_round_trips_the_handoff(script: ModuleType) -> None:
    # edgetune -> official -> edgetune gives back every tensor exactly
    state = _edgetune_state(epoch=5)
    back = script.edgetune_state(script.official_state(state, epochs=20, seed=0), state)
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v), k
    for i in range(8):
        assert torch.equal(
            back["optimizer"]["state"][i]["momentum_buffer"],
            state["optimizer"]["state"][i]["momentum_buffer"],
        )


def test_adopt_takes_the_official_network_and_keeps_edgetunes_position(script: ModuleType) -> None:
    template = _edgetune_state(epoch=5)
    got = script.edgetune_state(_official_ck(script, 5), template)
    for n in range(3):
        idx = got["model"][f"layers.{n}.indices"]
        assert idx.dtype == torch.int32 and idx.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]  # row-major
        assert torch.equal(got["model"][f"layers.{n}.values"], torch.full((4,), 0.5 + n))
        assert torch.equal(got["optimizer"]["state"][2 * n]["momentum_buffer"], torch.full((4,), -1.0 - n))
    assert got["loop"] == template["loop"] and got["callbacks"] == template["callbacks"]
    assert got["window"] == {}  # the first train record after it averages the adopted run's steps alone
    assert template["model"]["layers.0.values"].numel() == 5  # the template itself is left as it was


def test_adopt_refuses_a_template_at_another_point(script: ModuleType) -> None:
    with pytest.raises(SystemExit, match="end of epoch 5"):
        script.edgetune_state(_official_ck(script, 5), _edgetune_state(epoch=6))
    with pytest.raises(SystemExit, match="end of epoch 5"):
        script.edgetune_state(_official_ck(script, 5), _edgetune_state(epoch=5, batch=2))
    template = _edgetune_state(epoch=5)
    template["callbacks"]["0:sparse"]["updates"] = 4
    with pytest.raises(SystemExit, match="made 5 topology updates by epoch 5, the template 4"):
        script.edgetune_state(_official_ck(script, 5), template)


def test_adopt_writes_an_edgetune_run_folder_the_report_pairs(script: ModuleType, tmp_path: Path) -> None:
    from edgetune.train.checkpoint import CheckpointManager

    run = tmp_path / "et-own" / "x-e20-chts-s1"  # edgetune's own run: the template's folder
    path = CheckpointManager(run / "checkpoints").save(
        30,
        dict(_edgetune_state(epoch=3), loop={"step": 30, "epoch": 3, "batch": 0, "records": 4}),
        {"layers.0.values": ["dynamic:1", "float32"]},
    )
    own = [0.5, 0.6, 0.7] + [0.80] * 17
    rows = [{"kind": "eval", "split": "test", "epoch": e + 1, "acc": a} for e, a in enumerate(own)]
    rows.insert(1, {"kind": "train", "epoch": 1, "acc": 0.1})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "config.yaml").write_text("train:\n  epochs: 20\n")
    official = [0.55, 0.65, 0.75] + [0.78] * 17
    _official_log(tmp_path, "e20-s1", official)
    torch.save(_official_ck(script, 3), tmp_path / "official" / "e20-s1" / "checkpoint.pt")
    out = tmp_path / "adopted" / "y-e20-chts-s1"
    args = type(
        "A",
        (),
        {
            "official": str(tmp_path / "official" / "e20-s1"),
            "checkpoint": None,
            "template": str(path),
            "out": str(out),
        },
    )()
    script._adopt(args)
    ck = CheckpointManager.load(CheckpointManager(out / "checkpoints").latest())
    assert ck.step == 30 and torch.equal(ck.state["model"]["layers.2.values"], torch.full((4,), 2.5))
    assert ck.fingerprint == {"layers.0.values": ["dynamic:1", "float32"]}
    written = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # the 4 records before the checkpoint; the test accuracies of epochs 1-3 are the official run's
    assert [r["acc"] for r in written] == [0.55, 0.1, 0.65, 0.75]
    assert (out / "config.yaml").read_text() == "train:\n  epochs: 20\n"
    assert script.handoff_epoch(out) == 3
    with pytest.raises(SystemExit, match="exists"):
        script._adopt(args)
    # edgetune continued it (epochs 4-20): the report pairs it with the official run after epoch 3
    rows = [
        {"kind": "eval", "split": "test", "epoch": e + 1, "acc": a}
        for e, a in enumerate(official[:3] + [0.79] * 17)
    ]
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    script._report(
        type(
            "A",
            (),
            {
                "official": str(tmp_path / "official"),
                "edgetune": str(tmp_path / "adopted"),
                "out": str(tmp_path / "o"),
                "partial": False,
            },
        )()
    )
    md = (tmp_path / "o.md").read_text()
    assert "| edgetune from official's | 1 | 3 | 0.7800 | 0.7900 | +1.00 |" in md


def test_adopt_refuses_an_official_run_of_another_length(script: ModuleType, tmp_path: Path) -> None:
    from edgetune.train.checkpoint import CheckpointManager

    run = tmp_path / "run"
    path = CheckpointManager(run / "checkpoints").save(30, _edgetune_state(epoch=3), {})
    (run / "config.yaml").write_text("train:\n  epochs: 30\n")
    (run / "metrics.jsonl").write_text("")
    _official_log(tmp_path, "e20-s1", [0.5, 0.6, 0.7])
    torch.save(_official_ck(script, 3), tmp_path / "official" / "e20-s1" / "checkpoint.pt")
    args = type(
        "A",
        (),
        {
            "official": str(tmp_path / "official" / "e20-s1"),
            "checkpoint": None,
            "template": str(path),
            "out": str(tmp_path / "out"),
        },
    )()
    with pytest.raises(SystemExit, match="planned for 30 epochs, the official run for 20"):
        script._adopt(args)
    assert not (tmp_path / "out").exists()
    args.checkpoint = str(tmp_path / "e2.pt")  # no copy kept at that epoch
    with pytest.raises(SystemExit, match=r"no official checkpoint .*e2\.pt: give --checkpoint"):
        script._adopt(args)
    args.checkpoint, args.template = None, str(tmp_path / "nope.json")
    with pytest.raises(SystemExit, match="--template: checkpoint .*nope.json does not exist"):
        script._adopt(args)
    (run / "config.yaml").unlink()
    args.template = str(path)
    with pytest.raises(SystemExit, match="is not an edgetune run folder"):
        script._adopt(args)
