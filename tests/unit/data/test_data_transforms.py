"""Per-batch transforms: ToFloat (uint8 images to [0, 1]) and TrimPadding (cut padded token columns)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetune.data.batches import compose
from edgetune.data.common import images_to_tensor
from edgetune.data.transforms import ToFloat, TrimPadding


def test_to_float_equals_the_old_float_loading_bit_for_bit() -> None:
    raw = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    old = images_to_tensor(raw)  # what loaders returned before: float32(v) / 255
    x = torch.from_numpy(raw).unsqueeze(1)
    y = torch.arange(4)
    out = ToFloat()([x, y])
    assert out[0].dtype == torch.float32 and torch.equal(out[0], old) and out[1] is y
    assert float(out[0].max()) == 1.0 and float(out[0][0, 0, 0, 1]) == pytest.approx(1 / 255)
    assert x.dtype == torch.uint8  # the stored batch is not changed in place


def test_to_float_dict_batch_and_float_passthrough() -> None:
    pix = torch.full((2, 3, 4, 4), 16, dtype=torch.uint8)
    batch = {"pixel_values": pix, "labels": torch.tensor([0, 1])}
    out = ToFloat(divisor=16)(batch)
    assert torch.equal(out["pixel_values"], torch.ones(2, 3, 4, 4)) and out["labels"] is batch["labels"]
    f = torch.rand(2, 1, 3, 3)
    assert ToFloat()([f, torch.tensor([0, 1])])[0] is f  # already float: untouched, so applying twice is safe
    assert ToFloat()({"input_ids": torch.ones(2, 3, dtype=torch.long)})["input_ids"].dtype == torch.long
    with pytest.raises(ValueError):
        ToFloat(divisor=0)


def test_trim_padding_right_and_left() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 0, 0, 0, 0, 0]])
    labels = torch.tensor([1, 0])
    out = TrimPadding()({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert out["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]] and out["attention_mask"].shape == (2, 3)
    assert out["labels"] is labels
    left = TrimPadding()({"input_ids": ids.flip(1), "attention_mask": mask.flip(1), "labels": labels})
    assert left["input_ids"].tolist() == [[7, 6, 5], [0, 0, 5]]
    full = {"input_ids": ids[:, :1], "attention_mask": mask[:, :1], "labels": labels}
    assert TrimPadding()(full) is full  # nothing to cut
    lst = [ids, labels]
    assert TrimPadding()(lst) is lst


def test_compose_runs_in_order() -> None:
    t = compose(None, ToFloat(), None)
    assert isinstance(t, ToFloat)
    both = compose(ToFloat(divisor=2), ToFloat(divisor=4))  # the second sees floats and passes them on
    assert (
        both is not None
        and float(both([torch.tensor([[4]], dtype=torch.uint8), torch.tensor([0])])[0]) == 2.0
    )
