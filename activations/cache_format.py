"""The activation-cache format: folder layout, file names, dtypes, manifests, shard files.

Layout of a cache folder (`CacheConfig.out`):

    cache_config.json                  what was asked (model, hooks, text, dtype, ...): resume
                                       key, and a config file that redoes the run:
                                       `sae cache --config <cache>/cache_config.json`
    n_contexts.json                    contexts in the whole split, when it had to be counted
    .sae.lock                          held while a `sae cache` writes here (sae/locks.py)
    blocks.0.mlp.hook_post/            one folder per hook
        shard-00-000000.safetensors    rank 00, shard 0 (see below)
        part-00.json                   rank 00's shard list, written when the rank is done
        manifest.json                  what readers open: model, hook_name, dataset, dtype, d_in,
                                       context_size, drop_bos, n_tokens, shards, per-dimension
                                       mean, mean_squared_norm

Each entry of a manifest's (and a part's) `shards` list is {"file", "n_rows", "bytes",
"sha256"}: the shard's size and the SHA-256 of its bytes, computed while it is written.
Readers compare every shard's size on open (a stat each); `sae cache --verify` compares the
checksums. Manifests written before checksums existed lack "bytes"/"sha256": they are still
read, the size a shard must have then comes from its own header (`shard_problem`).

A shard is a safetensors file holding `activations` [N, D] in the stored dtype (`StorageDtype`),
the per-row metadata columns of `META_COLUMNS` (token_ids [N] int32, sequence [N] int64: the
context's index in the text stream, position [N] int32: the token's index in its context), and
float64 `stat_sum` [D] / `stat_sq_norm` [1] of the float32 rows, kept per shard so statistics
survive a resume. Rows of one context are consecutive within a rank's shards.

Shard k of a rank holds rows [k * shard_tokens, (k + 1) * shard_tokens) of that rank's
deterministic row stream and is written under a temporary name then renamed (`sae.atomic`), so
a present shard is a complete one, and a damaged one can be computed again on its own. Each rank lists its shards in a part manifest; when every
rank's part exists they merge into manifest.json (activations/cache_writer.py writes all of
this, activations/reader.py reads it).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from sae.errors import UserError

FORMAT = "sae-activation-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG_FILE = "cache_config.json"
COUNT_FILE = "n_contexts.json"

StorageDtype = Literal["float32", "bfloat16", "float16"]
"""Dtypes activations are stored in (names of `sae.devices.DTYPES`)."""

META_COLUMNS: dict[str, torch.dtype] = {
    "token_ids": torch.int32,
    "sequence": torch.int64,
    "position": torch.int32,
}
"""The per-row metadata columns of a shard and their dtypes."""

META_BYTES_PER_ROW = sum(dtype.itemsize for dtype in META_COLUMNS.values())

SAFETENSORS_CODES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}
"""The safetensors header's dtype code of every dtype a shard holds."""

_FROM_CODE = {code: dtype for dtype, code in SAFETENSORS_CODES.items()}


def shard_name(rank: int, index: int) -> str:
    return f"shard-{rank:02d}-{index:06d}.safetensors"


def part_name(rank: int) -> str:
    return f"part-{rank:02d}.json"


def hook_dir(out: Path, hook_name: str) -> Path:
    """The folder of one hook inside a cache folder."""
    return Path(out) / hook_name


def repair_command(root: Path, world_size: int = 1) -> str:
    """The command that checks a cache and rewrites its damaged shards."""
    run = "sae" if world_size == 1 else f"torchrun --nproc-per-node {world_size} -m sae.cli"
    return f"{run} cache --config {Path(root) / CONFIG_FILE}"


# -- shard files ----------------------------------------------------------------------------


def write_safetensors(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> dict[str, Any]:
    """Write a safetensors file straight from the tensors' memory; returns its manifest
    fields {"bytes", "sha256"}, hashed from memory as it is written (no second read).

    `safetensors.torch.save_file` first copies every tensor into a Python bytes object; this
    writes the same format (loadable by `safetensors.safe_open` / `load_file`) with no copy,
    and with a fixed header order, so the same rows always give the same bytes.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    flat = {}
    for name, t in tensors.items():
        data = t.detach().contiguous().reshape(-1).view(torch.uint8)
        header[name] = {
            "dtype": SAFETENSORS_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + data.numel()],
        }
        offset += data.numel()
        flat[name] = data
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            fh.write(chunk)
            digest.update(chunk)
        for data in flat.values():
            array = data.numpy()
            array.tofile(fh)
            digest.update(array.data)
    return {"bytes": 8 + len(raw) + offset, "sha256": digest.hexdigest()}


def file_sha256(path: Path, chunk: int = 16 * 2**20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > 100 * 2**20:
            raise ValueError(f"header length {header_len}")
        header = json.loads(fh.read(header_len))
    return header_len, header


def shard_problem(path: Path, entry: dict[str, Any] | None = None) -> str | None:
    """What is wrong with a shard file, cheaply (a stat, and a header read when the manifest
    entry has no size); None if nothing is. The checksum is not read (see `verify_shard`)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing"
    if entry is not None and "bytes" in entry:
        want = int(entry["bytes"])
    else:
        try:
            header_len, header = _header(path)
            want = (
                8
                + header_len
                + max(
                    (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                    default=0,
                )
            )
        except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError):
            return f"unreadable header ({size} bytes)"
    if size != want:
        return f"{size} bytes, expected {want}"
    return None


def verify_shard(path: Path, entry: dict[str, Any]) -> str | None:
    """`shard_problem`, then the checksum if the entry has one; None if the shard is sound."""
    problem = shard_problem(path, entry)
    if problem is None and "sha256" in entry and file_sha256(path) != entry["sha256"]:
        problem = "checksum differs"
    return problem


def memmap_activations(path: Path) -> Tensor:
    """The `activations` tensor of a shard as a read-only-in-practice memory map (no copy)."""
    header_len, header = _header(path)
    info = header["activations"]
    dtype = _FROM_CODE[info["dtype"]]
    begin, end = info["data_offsets"]
    if end == begin:
        return torch.empty(info["shape"], dtype=dtype)
    # mode "c" (copy-on-write) gives a writable view torch accepts without a warning; pages are
    # still read lazily from the file and never written back.
    raw = np.memmap(
        path, dtype=np.uint8, mode="c", offset=8 + header_len + begin, shape=(end - begin,)
    )
    return torch.from_numpy(raw).view(dtype).view(info["shape"])


def read_meta_columns(path: Path) -> dict[str, Tensor]:
    """The per-row metadata columns (`META_COLUMNS`) of a shard, read into memory."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as st:
        return {name: st.get_tensor(name) for name in META_COLUMNS}


# -- manifests and the cache's config -------------------------------------------------------


def read_cache_config(path: str | Path) -> dict[str, Any] | None:
    """The cache's config (model, hooks, text, ...) for a cache root or one of its hook
    folders; None if neither holds one."""
    path = Path(path)
    for folder in (path, path.parent):
        if (folder / CONFIG_FILE).is_file():
            return json.loads((folder / CONFIG_FILE).read_text())
    return None


def open_manifest(path: str | Path, hook_name: str | None = None) -> tuple[Path, dict[str, Any]]:
    """(hook folder, manifest) for a cache root plus hook name, or a hook folder itself.

    A root caching a single hook may be given without its name.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"activation cache {path} does not exist")
    if hook_name is None and not (path / MANIFEST).is_file() and (path / CONFIG_FILE).is_file():
        hooks = json.loads((path / CONFIG_FILE).read_text())["hooks"]
        if len(hooks) != 1:
            raise UserError(f"{path} caches several hooks ({', '.join(hooks)}); pick one")
        hook_name = hooks[0]
    folder = hook_dir(path, hook_name) if hook_name is not None else path
    if hook_name is not None and not folder.is_dir():
        raise UserError(f"{path} has no cached hook {hook_name!r}")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        config = folder.parent / CONFIG_FILE
        if config.is_file():
            world = json.loads(config.read_text()).get("world_size", 1)
            missing = [r for r in range(world) if not (folder / part_name(r)).is_file()]
            raise UserError(
                f"activation cache {folder} is incomplete (rank(s) {missing} not finished); "
                "run the same `sae cache` command again to resume it"
            )
        raise UserError(f"{folder} is not an activation cache: no {MANIFEST}")
    return folder, json.loads(manifest_path.read_text())
