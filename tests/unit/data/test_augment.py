"""Train-only crop/flip augmentation: equal to a per-image loop reference, training batches only, exact resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgetune.core.config import validate
from edgetune.core.errors import ConfigError
from edgetune.core.hooks import Callback, TrainState
from edgetune.data.augment import AugmentConfig, CropFlip, build_augment
from edgetune.data.base import DataConfig
from edgetune.train.checkpoint import CheckpointManager
from edgetune.train.config import TrainConfig
from edgetune.train.loop import Trainer


def reference(x: torch.Tensor, padding: int, hflip: bool) -> torch.Tensor:
    """Per image: zero-pad, crop at the drawn offset, then flip; draws made in CropFlip's order."""
    b, _, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (b,))
    dx = torch.randint(0, 2 * padding + 1, (b,))
    flip = torch.rand(b) < 0.5 if hflip else torch.zeros(b, dtype=torch.bool)
    out = torch.empty_like(x)
    for i in range(b):
        big = torch.zeros(x.shape[1], h + 2 * padding, w + 2 * padding)
        big[:, padding : padding + h, padding : padding + w] = x[i]
        crop = big[:, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@pytest.mark.parametrize(("padding", "hflip"), [(4, True), (2, False), (0, True), (3, True)])
def test_crop_flip_equals_the_per_image_reference(padding: int, hflip: bool) -> None:
    x = torch.rand(16, 3, 8, 6)
    y = torch.arange(16)
    torch.manual_seed(7)
    got_x, got_y = CropFlip(padding, hflip)([x, y])
    torch.manual_seed(7)
    want = reference(x, padding, hflip)
    assert torch.equal(got_x, want)
    assert torch.equal(got_y, y)  # labels untouched


def test_crops_move_pixels_and_flips_happen() -> None:
    x = torch.rand(64, 1, 8, 8) + 1.0  # no zero pixel in the image itself
    torch.manual_seed(0)
    out = CropFlip(4, hflip=False)([x])[0]
    padded = (out == 0).flatten(1).any(dim=1)
    assert 0.5 < padded.float().mean() < 1.0  # most crops show padding, the centred ones (1/81 each) do not
    torch.manual_seed(0)
    flipped = CropFlip(0, hflip=True)([x])[0]
    same = (flipped == x).flatten(1).all(dim=1)
    mirrored = (flipped == x.flip(-1)).flatten(1).all(dim=1)
    assert bool((same | mirrored).all()) and 16 < int(mirrored.sum()) < 48


def test_dict_batches_augment_their_image_column_only() -> None:
    batch = {"pixel_values": torch.rand(4, 3, 8, 8), "labels": torch.arange(4)}
    out = CropFlip(2, True)(batch)
    assert out["pixel_values"].shape == (4, 3, 8, 8) and torch.equal(out["labels"], batch["labels"])
    assert CropFlip(2, True)({"input_ids": torch.zeros(2, 5)})["input_ids"].shape == (2, 5)


def test_bad_settings_are_clear_errors() -> None:
    assert build_augment(None, (3, 32, 32)) is None
    assert build_augment(AugmentConfig(), (3, 32, 32)) is None  # nothing asked
    with pytest.raises(ConfigError, match=r"needs image inputs \(C, H, W\).*\(128,\)"):
        build_augment(AugmentConfig(hflip=True), (128,))
    with pytest.raises(ConfigError, match="crop_padding=8 is not smaller than the images"):
        build_augment(AugmentConfig(crop_padding=8), (1, 8, 8))
    with pytest.raises(ConfigError, match="image batches"):
        CropFlip(2)([torch.zeros(4, 10)])
    cfg = validate(DataConfig, {"name": "digits", "augment": {"crop_padding": 4, "hflip": True}})
    assert cfg.augment == AugmentConfig(crop_padding=4, hflip=True)
    with pytest.raises(ConfigError, match="crop_pad"):
        validate(DataConfig, {"name": "digits", "augment": {"crop_pad": 4}})


# ------------------------------------------------------------------------------------------- in the loop
def images(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 6, 6, generator=g) + 0.01  # no zero pixel: padding shows as zeros
    x[y == 1, :, :, :3] += 1.0  # class 1: bright left half
    return TensorDataset(x, y)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 2))


def train_cfg() -> TrainConfig:
    return validate(TrainConfig, {"epochs": 2, "batch_size": 16, "progress": False,
                                  "optimizer": {"name": "sgd", "lr": 0.1},
                                  "checkpoint": {"every_steps": 3, "keep_last": 100}})


class Seen(nn.Module):
    """Wraps a model; keeps every input it receives in training mode and in eval mode."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs[self.training].append(x.detach().clone())
        return self.inner(x)


def test_the_loop_augments_training_batches_only(tmp_path) -> None:
    seen = Seen(model())
    tr = Trainer(seen, images(64, 0), train_cfg(), test=images(32, 1), train_transform=CropFlip(2, True))
    plain = Trainer(model(), images(64, 0), train_cfg(), test=images(32, 1))
    tr.fit()
    plain.fit()
    padded = [bool((x == 0).any()) for x in seen.inputs[True]]
    assert all(padded)  # every training batch holds zero-padded crops (the images have no zero pixel)
    assert seen.inputs[False] and not any(bool((x == 0).any()) for x in seen.inputs[False])  # eval: untouched
    # evaluation never augments: the same weights score the same with and without the train transform
    plain.model.load_state_dict(seen.inner.state_dict())
    assert tr.evaluate_all() == plain.evaluate_all()


def test_augmented_training_resumes_exactly(tmp_path) -> None:
    def trainer(d: str, callbacks=()) -> Trainer:
        return Trainer(model(), images(64, 0), train_cfg(), run_dir=tmp_path / d, seed=1, callbacks=list(callbacks),
                       train_transform=CropFlip(2, True))

    full = trainer("a")
    full.fit()

    class Crash(Callback):
        def after_optimizer_step(self, s: TrainState) -> None:
            if s.step == 7:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer("b", [Crash()]).fit()
    assert CheckpointManager(tmp_path / "b" / "checkpoints").latest().name == "step-000000006.json"  # mid-epoch 2
    torch.manual_seed(99)  # a fresh process: resume must restore the generator the crops come from
    again = trainer("b", [Callback()])  # the same callbacks as the crashed run (a no-op stands for Crash)
    assert again.resume()
    again.fit()
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, full.model.state_dict()[k]), k
