"""Device and dtype names as the CLIs and config files spell them, resolved to torch objects.

`resolve_device` is the one place that turns `auto`, `cpu`, `cuda`, `cuda:1` or `mps` into a
`torch.device` (caching, training, analysis and the server all go through it); `DTYPES` is the
one name -> dtype table (dictionary weights, cached activations, model dtypes).
"""

from __future__ import annotations

import os

import torch

from sae.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
"""Dtype names accepted in configs and files, in the order error messages list them."""


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device named `name`; UserError if it is not available on this machine.

    `auto` picks cuda, then mps, then cpu. A cuda device without an index takes
    `cuda:local_rank` (default: the LOCAL_RANK torchrun sets, else 0), so each process of a
    torchrun job gets its own GPU.
    """
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name} requested but no CUDA device is available")
        if device.index is None:
            rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
            device = torch.device("cuda", rank)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device mps requested but MPS is not available")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: a CUDA GPU that supports bf16
    (Ampere and later), or a CPU with AVX512-BF16 or AMX (oneDNN's check), where a bf16 matmul
    runs 2-4x faster than float32. Elsewhere bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False
