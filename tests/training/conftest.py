"""Training tests use tiny matmuls on a shared 2-core box, where a second OpenMP thread only
adds spin-waiting: every module here runs torch on one thread."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    yield
