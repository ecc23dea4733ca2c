"""Gemma Scope parameter files (Lieberum et al. 2024): `params.npz` holding W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_enc, b_dec and threshold [d_sae] (some files spell them `w_enc`...).

JumpReLU with no b_dec subtraction on the input (their `encode` is x @ W_enc + b_enc). There
is no config file: sizes come from the arrays, and where the path follows the hub layout
(`gemma-scope-2b-pt-res/layer_20/width_16k/...`) the model and hook name come from it.
Read with `allow_pickle=False`: an .npz from the internet must never unpickle.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from sae import io
from sae.base import Dictionary, DictionaryConfig
from sae.errors import DictionaryFormatError

PARAMS_FILE = "params.npz"
NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)")
_LAYER = re.compile(r"layer_(\d+)")
_HOOKS = {
    "res": "blocks.{}.hook_resid_post",
    "mlp": "blocks.{}.hook_mlp_out",
    "att": "blocks.{}.attn.hook_z",
}


def detect(root: Path) -> bool:
    return (root / PARAMS_FILE).is_file()


def load(root: Path) -> Dictionary:
    path = root / PARAMS_FILE
    arrays = _read_npz(path)
    t = {name: _tensor(path, arrays, name) for name in NAMES}
    d_in, d_sae = t["W_enc"].shape if t["W_enc"].ndim == 2 else (0, 0)
    if d_in == 0:
        raise DictionaryFormatError(path, "W_enc", f"expected 2 dims, got {t['W_enc'].ndim}")
    hook_name, model_name = _names_from_path(root)
    cfg = DictionaryConfig(
        architecture="jumprelu",
        d_in=d_in,
        d_sae=d_sae,
        dtype=io.dtype_name(t["W_enc"].dtype),
        hook_name=hook_name,
        model_name=model_name,
        apply_b_dec_to_input=False,
        provenance={"source_format": "gemmascope"},
    )
    d = io.build_checked(path, cfg)
    io.assign_weights(path, d, t, t["W_enc"].dtype)
    return d


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DictionaryFormatError(path, None, f"not a readable .npz file: {e}") from None


def _tensor(path: Path, arrays: dict[str, np.ndarray], name: str) -> torch.Tensor:
    alt = "w_" + name[2:] if name.startswith("W_") else name
    key = name if name in arrays else alt
    if key not in arrays:
        have = ", ".join(sorted(arrays)) or "nothing"
        raise DictionaryFormatError(path, name, f"missing array (file has: {have})")
    arr = arrays[key]
    if arr.dtype.kind != "f":
        raise DictionaryFormatError(path, name, f"unsupported dtype {arr.dtype}; expected float")
    return io.check_float(path, name, torch.from_numpy(np.ascontiguousarray(arr)))


def _names_from_path(root: Path) -> tuple[str | None, str | None]:
    text = str(root.resolve())
    repo, layer = _REPO.search(text), _LAYER.search(text)
    if repo is None:
        return None, None
    size, kind, site = repo.groups()
    model = f"gemma-2-{size}" + ("-it" if kind == "it" else "")
    hook = _HOOKS[site].format(layer.group(1)) if layer else None
    return hook, model
