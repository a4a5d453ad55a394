"""IncrementalLearner: prototypes against naive class means, TEEN against its formula, sessions, save/load,
and bad input that leaves the learner as it was."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edgetune.core.errors import CheckpointError, ConfigError, ShapeError
from edgetune.incremental.features import Backbone
from edgetune.incremental.learner import IncrementalLearner
from edgetune.incremental.prototypes import teen_calibrate


def _clusters(classes: int, per_class: int, dim: int = 16, spread: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1) * 3
    y = torch.arange(classes).repeat_interleave(per_class)
    z = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return z, y, centres


def test_prototypes_are_normalized_class_means() -> None:
    z, y, _ = _clusters(4, 5)
    for normalize_first in (True, False):
        learner = IncrementalLearner(normalize_first=normalize_first).fit_base_features(z, y)
        p = learner.prototypes()
        for c in range(4):
            rows = z[y == c]
            rows = F.normalize(rows, dim=1) if normalize_first else rows
            mean = rows.double().sum(0) / len(rows)
            torch.testing.assert_close(p[c], mean / mean.norm())
        # prediction = argmax of cosine to the prototypes, checked one sample at a time
        pred = learner.predict_features(z)
        for i in range(len(z)):
            cos = [float(F.cosine_similarity(z[i].double(), p[c], dim=0)) for c in range(4)]
            assert int(pred[i]) == max(range(4), key=cos.__getitem__)


def test_teen_matches_its_formula_by_hand() -> None:
    base = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    novel = F.normalize(torch.tensor([[1.0, 1.0]]), dim=1)
    got = teen_calibrate(novel, base, shift=0.1, temperature=16.0)
    w = torch.softmax(16 * (novel @ base.T), dim=1)  # symmetric: (0.5, 0.5)
    delta = F.normalize(w @ base, dim=1)
    want = F.normalize(0.9 * novel + 0.1 * delta, dim=1)
    torch.testing.assert_close(got, want)
    lopsided = F.normalize(torch.tensor([[1.0, 0.2]]), dim=1)
    moved = teen_calibrate(lopsided, base, shift=0.5)
    assert moved[0, 0] > lopsided[0, 0]  # pulled towards the base prototype it resembles
    with pytest.raises(ConfigError, match="shift"):
        teen_calibrate(novel, base, shift=1.5)


def test_sessions_add_classes_and_keep_base() -> None:
    z, y, _ = _clusters(8, 20)
    base = y < 5
    learner = IncrementalLearner().fit_base_features(z[base], y[base])
    assert learner.classes == [0, 1, 2, 3, 4]
    for c in (5, 6, 7):
        shot = torch.nonzero(y == c)[0]
        assert learner.add_classes_features(z[shot], y[shot]) == [c]
    r = learner.evaluate_features(z, y)
    assert r["acc"] > 0.95 and r["base_acc"] > 0.95 and r["novel_acc"] > 0.9
    assert math.isclose(r["hm"], 2 * r["base_acc"] * r["novel_acc"] / (r["base_acc"] + r["novel_acc"]))


def test_update_folds_examples_in_exactly() -> None:
    z, y, _ = _clusters(3, 6)
    learner = IncrementalLearner().fit_base_features(z[y < 2], y[y < 2])
    learner.add_classes_features(z[y == 2][:2], y[y == 2][:2])
    learner.add_classes_features(z[y == 2][2:], y[y == 2][2:], update=True)
    whole = IncrementalLearner().fit_base_features(z, y)
    torch.testing.assert_close(learner.prototypes()[2], whole.prototypes()[2])


def test_bad_input_is_refused_and_learner_unchanged() -> None:
    z, y, _ = _clusters(4, 5)
    learner = IncrementalLearner(min_shots=2).fit_base_features(z[y < 3], y[y < 3])
    before = (learner.classes[:], learner.sums.clone(), learner.counts.clone())
    with pytest.raises(ConfigError, match=r"already known \(base classes \[1\]\).*update=True"):
        learner.add_classes_features(z[y == 1][:2], y[y == 1][:2])
    with pytest.raises(ConfigError, match="empty"):
        learner.add_classes_features(z[:0], y[:0])
    with pytest.raises(ConfigError, match="min_shots=2"):
        learner.add_classes_features(z[y == 3][:1], y[y == 3][:1])
    with pytest.raises(ShapeError, match="dimension 8 but the learner's prototypes have 16"):
        learner.add_classes_features(torch.randn(2, 8), torch.tensor([3, 3]))
    with pytest.raises(ConfigError, match=r"classes \[3\] the learner has not seen"):
        learner.evaluate_features(z, y)
    assert learner.classes == before[0]
    assert torch.equal(learner.sums, before[1]) and torch.equal(learner.counts, before[2])
    assert learner.add_classes_features(z[y == 3][:2], y[y == 3][:2]) == [3]  # still usable
    with pytest.raises(ConfigError, match="before fit_base"):
        IncrementalLearner().add_classes_features(z, y)
    with pytest.raises(ConfigError, match="calibration"):
        IncrementalLearner(calibration="teen2")
    with pytest.raises(ConfigError, match="needs a novelty gate"):
        IncrementalLearner(budget=0.02)


def test_save_load_round_trip_exact(tmp_path) -> None:
    z, y, _ = _clusters(6, 7)
    learner = IncrementalLearner(calibration="teen").fit_base_features(z[y < 4], y[y < 4])
    learner.add_classes_features(z[y >= 4][::7], y[y >= 4][::7])
    path = learner.save(tmp_path / "learner.safetensors")
    back = IncrementalLearner.load(path)
    assert back.classes == learner.classes and back.base_classes == learner.base_classes
    assert back.config == learner.config and back.sessions == learner.sessions
    assert torch.equal(back.sums, learner.sums) and torch.equal(back.counts, learner.counts)
    assert torch.equal(back.predict_features(z), learner.predict_features(z))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="not a readable learner file"):
        IncrementalLearner.load(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no learner file"):
        IncrementalLearner.load(tmp_path / "missing.safetensors")


def test_backbone_takes_the_heads_input_and_pooled_maps() -> None:
    from edgetune.models import MLP

    mlp = MLP(12, 3, widths=(8,))
    x = torch.randn(5, 12)
    torch.testing.assert_close(Backbone(mlp)(x), mlp.features(x))
    conv = torch.nn.Sequential()
    conv.add_module("features", torch.nn.Conv2d(3, 4, 3))
    conv.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
    conv.add_module("flat", torch.nn.Flatten())
    conv.add_module("head", torch.nn.Linear(4, 2))
    img = torch.randn(2, 3, 6, 6)
    pooled = Backbone(conv, layer="features", orders=(1, 2))(img)
    fmap = conv.features(img)
    torch.testing.assert_close(pooled, torch.cat([fmap.mean((2, 3)), fmap.std((2, 3), unbiased=False)], 1))
    with pytest.raises(ConfigError, match="no module 'feature'"):
        Backbone(conv, layer="feature", orders=(1,))
    with pytest.raises(ConfigError, match="orders needs layer"):
        Backbone(conv, orders=(1, 2))


def test_digits_six_plus_four_protocol() -> None:
    """P1 of the research notes: 6 base digits, then 4 sessions of 1-way 5-shot; s0 >= 95%, last >= 80%."""
    from edgetune.data import DataConfig, class_incremental_split, load_dataset
    from edgetune.incremental.heads import CosineHead
    from edgetune.incremental.sessions import run_sessions
    from edgetune.models import MLP

    torch.manual_seed(0)
    b = load_dataset(DataConfig(name="digits"))
    (x, y), (xt, yt) = b.train.tensors, b.test.tensors
    x, xt = x.float() / 255, xt.float() / 255
    model = MLP(64, 6, widths=(128, 64), batch_norm=True)
    model.head = CosineHead(64, 6, scale=16.0)
    base = y < 6
    xb, yb = x[base], y[base]
    opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        perm = torch.randperm(len(xb), generator=g)
        for i in range(0, len(xb), 128):
            j = perm[i:i + 128]
            loss = F.cross_entropy(model(xb[j]), yb[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    bb = Backbone(model)
    train, test = bb.extract(torch.utils.data.TensorDataset(x, y)), bb.extract(torch.utils.data.TensorDataset(xt, yt))
    split = class_incremental_split(y, yt, 6, (1, 4), shots=5, seed=0)
    recs = run_sessions(IncrementalLearner(), train, test, split)
    accs = [r["acc"] for r in recs]
    assert accs[0] >= 0.95 and accs[-1] >= 0.80, accs
    assert recs[-1]["classes"] == 10 and recs[-1]["novel_acc"] > 0.4


def test_gated_learner_calibrates_on_val_and_predicts_with_the_gate() -> None:
    from edgetune.incremental.gates import make_gate

    z, y, _ = _clusters(10, 80, spread=0.6, seed=3)
    base = y < 7
    val = (z[base][1::2], y[base][1::2])
    learner = IncrementalLearner(gate="base-gate-or-vanilla", budget=0.05)
    learner.fit_base_features(z[base][::2], y[base][::2], val)
    gate = make_gate("base-gate-or-vanilla", 0.05)
    want = gate.calibrate(F.normalize(val[0], dim=1), val[1], learner.prototypes().float(), 0.05)
    assert learner.threshold == pytest.approx(want)
    for c in (7, 8, 9):
        learner.add_classes_features(z[y == c][:1], y[y == c][:1])
    s = learner.scores_features(z)
    is_base = torch.tensor([c < 7 for c in learner.classes])
    torch.testing.assert_close(learner.predict_features(z), gate.predict(s, is_base, learner.threshold))
    with pytest.raises(ConfigError, match="held-out base data"):
        IncrementalLearner(gate="base-gate", budget=0.05).fit_base_features(z[base], y[base])
    with pytest.raises(ConfigError, match=r"classes \[8\] that are not base classes \(0-6\)"):
        IncrementalLearner(gate="base-gate", budget=0.05).fit_base_features(z[base], y[base], (z[y == 8], y[y == 8]))
    with pytest.raises(ConfigError, match="needs a forgetting budget"):
        IncrementalLearner(gate="base-gate")
