"""Training tests use tiny matmuls on a shared 2-core box, where a second OpenMP thread only
adds spin-waiting: run torch on one thread here."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
