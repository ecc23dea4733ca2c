"""resolve_device: auto prefers cuda > mps > cpu, a bare cuda takes this process's LOCAL_RANK,
and a device this machine lacks is a UserError, not a crash deep inside torch."""

from __future__ import annotations

import pytest
import torch

from sae.devices import DTYPES, resolve_device
from sae.errors import UserError


def machine(monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    machine(monkeypatch, cuda=False, mps=False)
    assert resolve_device("auto") == torch.device("cpu")
    machine(monkeypatch, cuda=False, mps=True)
    assert resolve_device("auto") == torch.device("mps")
    machine(monkeypatch, cuda=True, mps=True)
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_bare_cuda_takes_the_local_rank(monkeypatch):
    machine(monkeypatch, cuda=True, mps=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:2") == torch.device("cuda", 2)  # an explicit index wins


def test_explicit_devices_and_unavailable_ones(monkeypatch):
    machine(monkeypatch, cuda=False, mps=False)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu-ish")


def test_one_dtype_table():
    assert DTYPES["bfloat16"] is torch.bfloat16
    assert set(DTYPES) == {"float32", "float16", "bfloat16", "float64"}
