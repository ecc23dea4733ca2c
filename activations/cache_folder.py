"""The folder of one `sae cache` run: what identifies the run (its fingerprint, saved as
cache_config.json and compared on every start), refusing a folder that holds another run or
someone else's files, clearing a run that --overwrite replaces, and the shards already complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from activations.cache_format import (
    CONFIG_FILE,
    COUNT_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    hook_dir,
    shard_name,
)
from sae.atomic import atomic_write_json
from sae.dataclass_cli import to_dict
from sae.errors import UserError
from sae.locks import LOCK_NAME

if TYPE_CHECKING:
    from activations.cache import CacheConfig


def fingerprint_of(cfg: CacheConfig, shard_tokens: int, world_size: int) -> dict[str, Any]:
    """Everything that decides the bytes of the cache (not device, batch size, overwrite)."""
    text = to_dict(cfg.text)
    text.pop("batch_size")
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": cfg.model,
        "model_dtype": cfg.model_dtype,
        "hooks": list(cfg.hooks),
        "text": text,
        "dtype": cfg.dtype,
        "max_tokens": cfg.max_tokens,
        "shard_tokens": shard_tokens,
        "drop_bos": cfg.drop_bos,
        "world_size": world_size,
    }


def options_from_fingerprint(fingerprint: dict[str, Any], out: Path) -> dict[str, Any]:
    """CacheConfig options that redo the run a cache_config.json describes (in folder `out`).

    The text batch size is not part of the fingerprint (it does not change the rows); it is
    taken from a hook's manifest where there is one, so a repair batches contexts as the
    first run did.
    """
    options = {k: v for k, v in fingerprint.items() if k not in ("format", "version", "world_size")}
    for hook in fingerprint.get("hooks", []):
        manifest = hook_dir(out, hook) / MANIFEST
        if manifest.is_file():
            batch_size = json.loads(manifest.read_text()).get("dataset", {}).get("batch_size")
            if batch_size is not None:
                options["text"] = {**options.get("text", {}), "batch_size": batch_size}
            break
    return {**options, "out": str(out)}


def lock_name(rank: int) -> str:
    return LOCK_NAME if rank == 0 else f"{LOCK_NAME}.rank{rank:02d}"


def check_out(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Refuse a folder holding anything but this same run; writes nothing. Returns the config
    of a different run that `overwrite` will replace, None if there is none."""
    config_path = out / CONFIG_FILE
    if config_path.is_file():
        old = json.loads(config_path.read_text())
        if old == fingerprint:
            return None
        if not overwrite:
            changed = sorted(
                k for k in fingerprint.keys() | old.keys() if old.get(k) != fingerprint.get(k)
            )
            raise UserError(
                f"{out} holds a cache of a different run (differs in {', '.join(changed)}); "
                "pick another --out or pass --overwrite"
            )
        return dict(old)
    if out.exists():
        # Another rank of the same torchrun job may be a moment ahead: its hook folders, lock
        # and temporary files are expected here, anything else is someone else's data.
        ours = {*fingerprint["hooks"], COUNT_FILE}
        foreign = [
            p.name
            for p in out.iterdir()
            if p.name not in ours
            and not p.name.startswith(LOCK_NAME)
            and not (p.name.startswith(".") and p.name.endswith(".tmp"))
        ]
        if foreign:
            raise UserError(
                f"{out} is not empty and is not an activation cache (holds {foreign[0]}); "
                "pick another --out"
            )
    return None


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def start_out(out: Path, fingerprint: dict[str, Any], replacing: dict[str, Any] | None) -> None:
    """Clear the run being replaced, then record this run's config (the resume key)."""
    if replacing is not None:
        for name in replacing.get("hooks", []):
            shutil.rmtree(hook_dir(out, name), ignore_errors=True)
        (out / COUNT_FILE).unlink(missing_ok=True)
    if not (out / CONFIG_FILE).is_file() or replacing is not None:
        atomic_write_json(out / CONFIG_FILE, fingerprint)


def complete_shards(folder: Path, rank: int) -> int:
    """Number of this rank's shards 0, 1, 2, ... present (renamed, hence complete)."""
    for leftover in folder.glob(f".shard-{rank:02d}-*.tmp"):
        leftover.unlink(missing_ok=True)  # a temp file of a killed run: never complete
    n = 0
    while (folder / shard_name(rank, n)).is_file():
        n += 1
    return n
