"""data.normalize: per-channel standardisation against a loop reference, training-split statistics, padding with
normalised black under augmentation, clear errors for bad statistics and non-image data, and a run that uses it."""

from __future__ import annotations

import pytest
import torch

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError
from edgetune.data.augment import AugmentConfig, CropFlip, build_augment
from edgetune.data.base import DataConfig, load_dataset
from edgetune.data.normalize import NormalizeConfig, normalize_bundle
from edgetune.data.transforms import Normalize


def reference(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        m, s = (mean[c], std[c]) if len(mean) > 1 else (mean[0], std[0])
        out[:, c] = (x[:, c] - m) / s
    return out


@pytest.mark.parametrize(("mean", "std"), [([0.5, 0.25, -1.0], [0.2, 2.0, 0.5]), ([0.3], [0.4])])
def test_normalize_equals_the_per_channel_reference(mean: list[float], std: list[float]) -> None:
    x = torch.rand(5, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(5)
    out, labels = Normalize(mean, std)([x, y])
    assert torch.allclose(out, reference(x, mean, std), atol=1e-6) and torch.equal(labels, y)
    d = Normalize(mean, std)({"pixel_values": x, "labels": y})
    assert torch.equal(d["pixel_values"], out) and torch.equal(d["labels"], y)
    black = Normalize(mean, std).black.expand(3)  # one value or one per channel
    assert torch.allclose(black, reference(torch.zeros(1, 3, 1, 1), mean, std).flatten())


def test_train_statistics_standardise_the_training_split() -> None:
    plain = load_dataset(DataConfig(name="digits"))
    bundle = load_dataset(DataConfig(name="digits", normalize="train"))
    raw = plain.transform([plain.train.tensors[0]])[0].double()
    mean, std = raw.mean().item(), raw.std(unbiased=False).item()  # one channel: every pixel
    x = bundle.transform([bundle.train.tensors[0]])[0]
    assert torch.allclose(x.double(), (raw - mean) / std, atol=1e-5)
    assert abs(x.double().mean().item()) < 1e-5 and abs(x.double().std(unbiased=False).item() - 1) < 1e-5
    assert bundle.normalization is not None and bundle.normalization.mean.item() == pytest.approx(mean, rel=1e-6)
    assert any("normalized per channel by the training split" in n for n in bundle.notes)
    # the test split uses the training split's statistics, not its own
    t = bundle.transform([bundle.test.tensors[0]])[0].double()
    rt = plain.transform([plain.test.tensors[0]])[0].double()
    assert torch.allclose(t, (rt - mean) / std, atol=1e-5)


def test_given_statistics_and_a_fallback_dataset(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgetune.data.locate as locate_mod

    cfg = validate(DataConfig, {"name": "digits", "normalize": {"mean": [0.25], "std": [0.5]}})
    assert cfg.normalize == NormalizeConfig(mean=[0.25], std=[0.5])
    b = load_dataset(cfg)
    plain = load_dataset(DataConfig(name="digits"))
    x, raw = b.transform([b.test.tensors[0]])[0], plain.transform([plain.test.tensors[0]])[0]
    assert torch.allclose(x, (raw - 0.25) / 0.5)
    # Fashion-MNIST not installed: the fallback dataset is normalised once, as the named one would have been
    monkeypatch.setenv(locate_mod.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(locate_mod, "SYSTEM_ROOTS", (tmp_path,))
    fb = load_dataset(cfg.replace(name="fashion-mnist", fallback="digits"))
    assert fb.name == "digits" and torch.allclose(fb.transform([fb.test.tensors[0]])[0], x)
    assert sum("normalized" in n for n in fb.notes) == 1


def test_augmentation_after_normalisation_pads_with_normalised_black() -> None:
    norm = Normalize([0.5], [0.25])
    x = torch.rand(6, 1, 5, 5, generator=torch.Generator().manual_seed(1)) + 0.1
    torch.manual_seed(3)
    before = norm([CropFlip(2, True)([x])[0]])[0]  # torchvision's order: pad black, then normalise
    torch.manual_seed(3)
    after = build_augment(AugmentConfig(crop_padding=2, hflip=True), (1, 5, 5), norm.black)([norm([x])[0]])[0]
    assert torch.allclose(before, after) and bool((after == -2.0).any())  # padding present, as black


def test_bad_statistics_and_non_image_data_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="mean has 2 values and std 1"):
        validate(DataConfig, {"name": "digits", "normalize": {"mean": [0.1, 0.2], "std": [0.3]}})
    with pytest.raises(ConfigError, match="std must be positive"):
        validate(DataConfig, {"name": "digits", "normalize": {"mean": [0.1], "std": [0.0]}})
    with pytest.raises(ConfigError, match="normalize"):
        validate(DataConfig, {"name": "digits", "normalize": "imagenet"})
    with pytest.raises(ConfigError, match=r"3 means and stds for digits's 1-channel images; give one value or 1"):
        load_dataset(validate(DataConfig, {"name": "digits", "normalize": {"mean": [0.1] * 3, "std": [1.0] * 3}}))
    text = load_dataset(DataConfig(name="instructions"))
    with pytest.raises(ConfigError, match=r"works on image datasets .*Remove data.normalize"):
        normalize_bundle(text, "train")
    with pytest.raises(ValueError, match="float image batches"):
        Normalize([0.5], [0.5])([torch.zeros(2, 4, dtype=torch.uint8)])


def test_a_run_trains_on_normalised_inputs_and_reports_it(tmp_path) -> None:
    from edgetune.recipe import load_recipe
    from edgetune.runner import run

    def go(normalize):
        cfg = load_recipe({"name": "n", "seed": 0, "output_dir": str(tmp_path), "data": {"name": "digits",
                           "normalize": normalize}, "model": {"name": "mlp", "widths": [32]},
                           "train": {"epochs": 3, "batch_size": 32, "progress": False,
                                     "optimizer": {"name": "sgd", "lr": 0.05}}})
        return run(cfg, tmp_path / f"run-{normalize}", write_report=False, command="test").summary

    s = go("train")
    assert any("normalized per channel" in n for n in s["data_notes"])
    assert s["test_acc"] > 0.85  # standardised digits learn in 3 epochs of SGD
