"""Shared test settings: CPU, deterministic, quiet threads."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and immune to oversubscription


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
