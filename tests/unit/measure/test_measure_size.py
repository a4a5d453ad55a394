"""Parameter, non-zero and byte counts on hand-built models with known answers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from edgetune.core.errors import EdgetuneError
from edgetune.measure import (
    bytes_on_disk,
    count_nonzeros,
    count_parameters,
    state_dict_bytes,
    tensor_nonzeros,
)


def _csr(dense: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return dense.to_sparse_csr()


class _PackedSparse(nn.Module):
    """Stands in for a sparse layer: dense storage plus a mask, reporting its own count via nnz()."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(5, 5))  # 25 stored, but only the mask's 3 are real
        self.register_buffer("mask", torch.zeros(5, 5, dtype=torch.bool))
        self.mask[0, :3] = True

    def count_nonzeros(self) -> int:
        return int(self.mask.sum())


class _Hand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)  # 12 + 3 parameters
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 0], [0, 3, 0, 0]]))  # 3 nonzeros
            self.fc.bias.copy_(torch.tensor([0.0, 1, 1]))  # 2 nonzeros
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)  # 4 params, 4 nonzeros
        self.tied = self.fc  # the same module twice: counted once
        self.packed = _PackedSparse()  # 25 params, nnz() says 3
        self.register_buffer("running", torch.tensor([1.0, 0.0, 2.0]))  # buffer: 2 nonzeros
        self.register_buffer("steps", torch.tensor(7))  # integer: never a weight


def test_count_parameters_known_counts() -> None:
    m = _Hand()
    assert count_parameters(m) == 15 + 4 + 25
    assert count_parameters(m, trainable_only=True) == 15 + 25


def test_count_nonzeros_module_uses_nnz_protocol_and_dedupes() -> None:
    m = _Hand()
    assert count_nonzeros(m) == 3 + 2 + 4 + 3
    assert count_nonzeros(m, include_buffers=True) == 3 + 2 + 4 + 3 + 2


def test_count_nonzeros_state_dict_counts_floating_tensors_only() -> None:
    sd = _Hand().state_dict()  # tied module appears under two prefixes in a state dict
    expected = 2 * (3 + 2) + 4 + 25 + 2  # packed.weight is dense ones, mask is bool, steps int
    assert count_nonzeros(sd) == expected


def test_sparse_coo_and_csr_count_stored_values() -> None:
    dense = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    coo = dense.to_sparse()
    csr = _csr(dense)
    assert tensor_nonzeros(coo) == 3
    assert tensor_nonzeros(csr) == 3
    # An explicitly stored zero is still a stored value.
    explicit = torch.sparse_coo_tensor(
        torch.tensor([[0, 1], [0, 1]]), torch.tensor([0.0, 4.0]), (2, 2), check_invariants=True
    )
    assert tensor_nonzeros(explicit) == 2
    assert count_nonzeros({"a": coo, "b": csr, "c": dense}) == 9
    m = nn.Module()
    m.w = nn.Parameter(coo)
    assert count_nonzeros(m) == 3
    assert count_parameters(m) == 9  # parameters count the dense shape


def test_state_dict_bytes_dense_sparse_and_tied() -> None:
    w = torch.zeros(10, 20)
    w[0, :5] = 1.0
    assert state_dict_bytes({"w": w}) == 10 * 20 * 4
    assert state_dict_bytes({"w": w, "tied": w}) == 10 * 20 * 4  # same tensor under two keys
    assert state_dict_bytes({"w": w, "half": w[:5]}) == 10 * 20 * 4 + 5 * 20 * 4  # distinct views
    assert state_dict_bytes({"w": w.to_sparse()}) == 2 * 5 * 8 + 5 * 4  # int64 (2, nnz) indices + values
    csr = _csr(w)
    assert state_dict_bytes({"w": csr}) == (10 + 1) * 8 + 5 * 8 + 5 * 4  # crow + col + values
    lin = nn.Linear(3, 2).to(torch.float64)
    assert state_dict_bytes(lin) == (6 + 2) * 8


def test_bytes_on_disk_file_and_folder(tmp_path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.bin").write_bytes(b"y" * 234)
    assert bytes_on_disk(tmp_path / "a.bin") == 1000
    assert bytes_on_disk(tmp_path) == 1234
    (tmp_path / "link").symlink_to(tmp_path / "a.bin")
    assert bytes_on_disk(tmp_path) == 1234  # links are not followed
    with pytest.raises(EdgetuneError, match="no such file"):
        bytes_on_disk(tmp_path / "missing")


def test_count_nonzeros_rejects_other_types() -> None:
    with pytest.raises(EdgetuneError, match="nn.Module or a state dict"):
        count_nonzeros([torch.ones(2)])  # type: ignore[arg-type]
