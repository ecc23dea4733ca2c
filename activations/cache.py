"""The activation cache: run a model over packed text once, keep every hooked activation on disk.

Layout of a cache folder (`CacheConfig.out`):

    cache_config.json                  what was asked (model, hooks, text, dtype, ...): resume key
    blocks.0.mlp.hook_post/            one folder per hook
        shard-00-000000.safetensors    rank 00, shard 0: activations [N, D] (chosen dtype),
                                       token_ids [N] int32, sequence [N] int64, position [N]
                                       int32, and this shard's stat_sum [D] / stat_sq_norm [1]
                                       (float64) so statistics survive a resume
        part-00.json                   rank 00's shard list, written when the rank is done
        manifest.json                  the merged manifest the readers open (see `MANIFEST`)

Nothing lost, nothing doubled: shard k of a rank always holds rows [k * shard_tokens,
(k + 1) * shard_tokens) of that rank's deterministic row stream, and is written under a temporary
name then renamed (`sae.atomic`). A run killed at any moment restarts after the last shard that
every hook completed, skipping the covered contexts without running the model on them.

Past one machine: under `torchrun` each rank takes every world_size-th context of the same
stream (`activations.text.context_batches`) and writes its own shards and part manifest into
the same folders; whichever rank finishes last merges the parts into one manifest.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from activations.prefetch import in_background
from activations.text import TextConfig, check_source, context_batches, iter_contexts
from sae.atomic import atomic_path, atomic_write_json
from sae.dataclass_cli import to_dict
from sae.errors import UserError

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
CONFIG_FILE = "cache_config.json"
MANIFEST = "manifest.json"
FORMAT = "sae-activation-cache"
FORMAT_VERSION = 1
SHARD_TARGET_BYTES = 128 * 2**20
"""Auto shard size: about this many bytes of activations for the widest hook."""
META_BYTES_PER_ROW = 4 + 8 + 4
"""token_ids int32 + sequence int64 + position int32."""


@dataclass
class CacheConfig:
    """One caching run: which model, which hooks, which text, how to store it."""

    out: Path = Path("activation_cache")
    """Cache folder; an interrupted run in it is resumed."""
    model: str = "stdlib-1l-512"
    """Model: the bundled short name, a local Hugging Face directory, or a hub name."""
    hooks: tuple[str, ...] = ("blocks.0.mlp.hook_post",)
    """TransformerLens hook names, all cached in one forward pass."""
    text: TextConfig = field(default_factory=TextConfig)
    """The text source and packing (nested options --text.*)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Stored activation dtype. bfloat16 halves the disk of float32 (SAELens's default) with
    float32's range, so residual-stream outliers cannot overflow as they can in float16."""
    max_tokens: int | None = None
    """Stop after this many cached tokens (rows per hook, over all ranks); None: whole split."""
    shard_tokens: int = 0
    """Rows per shard; 0 picks about 128 MiB of the widest hook."""
    drop_bos: bool = True
    """Leave out position 0 (the BOS token of every context): its norm is an outlier that
    dominates reconstruction losses and says nothing about the text."""
    device: str = "auto"
    """Device to run the model on; auto: cuda (this rank's LOCAL_RANK) if present, else cpu."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in."""
    overwrite: bool = False
    """Replace a cache of a different run in `out` instead of refusing."""

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.shard_tokens < 0:
            raise ValueError(f"shard_tokens must be >= 0, got {self.shard_tokens}")
        if not self.hooks:
            raise ValueError("hooks must name at least one hook")


class CacheResult(NamedTuple):
    """What a caching run produced (for this rank)."""

    path: Path
    """The cache folder."""
    hook_dirs: dict[str, Path]
    """Folder of each hook (open with `CachedActivations`)."""
    n_tokens: int
    """Rows per hook this rank holds."""
    new_tokens: int
    """Rows computed by this call (less than n_tokens after a resume)."""
    seconds: float


class _Plan(NamedTuple):
    """Row accounting of one rank: which contexts it runs and how many rows they give."""

    rows_per_context: int
    max_contexts: int | None
    """Bound on the global context stream (from max_tokens); None: the whole dataset."""
    last_rows: int
    """Rows kept from the global context max_contexts - 1 (max_tokens need not fill it)."""


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from the torchrun environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def shard_name(rank: int, index: int) -> str:
    return f"shard-{rank:02d}-{index:06d}.safetensors"


def part_name(rank: int) -> str:
    return f"part-{rank:02d}.json"


def hook_dir(out: Path, hook_name: str) -> Path:
    return Path(out) / hook_name


# -- resume bookkeeping ---------------------------------------------------------------------


def _fingerprint(cfg: CacheConfig, shard_tokens: int, world_size: int) -> dict[str, Any]:
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


def _prepare_out(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> None:
    """Refuse (or with overwrite, clear) a folder holding anything but this same run."""
    config_path = out / CONFIG_FILE
    if config_path.is_file():
        old = json.loads(config_path.read_text())
        if old == fingerprint:
            return
        if not overwrite:
            changed = sorted(
                k for k in fingerprint.keys() | old.keys() if old.get(k) != fingerprint.get(k)
            )
            raise UserError(
                f"{out} holds a cache of a different run (differs in {', '.join(changed)}); "
                "pick another --out or pass --overwrite true"
            )
        for name in old.get("hooks", []):
            shutil.rmtree(hook_dir(out, name), ignore_errors=True)
        config_path.unlink()
    elif out.exists():
        # Another rank of the same torchrun job may be a moment ahead: its hook folders and
        # temporary files are expected here, anything else is someone else's data.
        ours = set(fingerprint["hooks"])
        foreign = [
            p.name
            for p in out.iterdir()
            if p.name not in ours and not (p.name.startswith(".") and p.name.endswith(".tmp"))
        ]
        if foreign:
            raise UserError(
                f"{out} is not empty and is not an activation cache (holds {foreign[0]}); "
                "pick another --out"
            )
    atomic_write_json(config_path, fingerprint)


def _complete_shards(folder: Path, rank: int) -> int:
    """Number of this rank's shards 0, 1, 2, ... present (renamed, hence complete)."""
    for leftover in folder.glob(f".shard-{rank:02d}-*.tmp"):
        leftover.unlink(missing_ok=True)  # a temp file of a killed run: never complete
    n = 0
    while (folder / shard_name(rank, n)).is_file():
        n += 1
    return n


def _plan(cfg: CacheConfig) -> _Plan:
    rows = cfg.text.context_size - (1 if cfg.drop_bos else 0)
    if cfg.max_tokens is None:
        return _Plan(rows, None, rows)
    n = math.ceil(cfg.max_tokens / rows)
    return _Plan(rows, n, cfg.max_tokens - (n - 1) * rows)


def _rank_rows(plan: _Plan, n_contexts: int, rank: int, world: int) -> int:
    """Rows this rank caches when the global stream has n_contexts contexts."""
    mine = len(range(rank, n_contexts, world))
    rows = mine * plan.rows_per_context
    truncated = plan.max_contexts is not None and n_contexts == plan.max_contexts > 0
    if truncated and (n_contexts - 1) % world == rank:
        rows -= plan.rows_per_context - plan.last_rows
    return rows


def _count_contexts(cfg: CacheConfig, tokenizer: Any) -> int | None:
    """Contexts in the whole split, by a tokenize-only pass, for a local or bundled source."""
    if cfg.text.dataset != "bundled" and not Path(cfg.text.dataset).expanduser().exists():
        return None  # a hub dataset: counting means downloading it
    from tqdm import tqdm

    n = 0
    for _ in tqdm(
        iter_contexts(cfg.text, tokenizer), desc="counting contexts", unit="ctx", leave=False
    ):
        n += 1
    return n


def check_free_disk(path: Path, needed: int) -> None:
    """UserError if the filesystem of `path` has fewer than `needed` free bytes."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserError(
            f"not enough free disk in {probe}: the cache needs {_human(needed)} "
            f"({needed} bytes), {_human(free)} free"
        )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


# -- writing --------------------------------------------------------------------------------


class _ShardWriter:
    """Writes shards on a background thread, so disk time overlaps the next forward pass."""

    def __init__(self, dtype: torch.dtype, metadata: dict[str, str]) -> None:
        self.dtype = dtype
        self.metadata = metadata
        self.queue: queue.Queue[tuple[Path, dict[str, Tensor]] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def submit(self, path: Path, rows: dict[str, Tensor]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((path, rows))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                self._write(*item)
            except BaseException as e:
                self.error = e

    def _write(self, path: Path, rows: dict[str, Tensor]) -> None:
        acts = rows["activations"]
        sum_D, sq_norm = shard_statistics(acts)
        tensors = {
            "activations": acts.to(self.dtype),
            "token_ids": rows["token_ids"],
            "sequence": rows["sequence"],
            "position": rows["position"],
            # Statistics of the float32 activations, per shard, so a resumed run still sums
            # over every row exactly once.
            "stat_sum": sum_D,
            "stat_sq_norm": sq_norm.reshape(1),
        }
        needed = sum(t.numel() * t.element_size() for t in tensors.values()) + 4096
        check_free_disk(path.parent, needed)
        with atomic_path(path) as tmp:
            write_safetensors(tmp, tensors, self.metadata)


def shard_statistics(acts: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """(sum over rows [D], sum of squared row norms) in float64 accumulators.

    Chunks are summed in float32 and accumulated in float64: as exact as statistics need, and
    without the full float64 copy of the shard (measured 20x faster than `.double()` first).
    """
    sum_D = torch.zeros(acts.shape[1], dtype=torch.float64)
    sq = torch.zeros((), dtype=torch.float64)
    for i in range(0, acts.shape[0], chunk):
        x = acts[i : i + chunk]
        sum_D += x.sum(0).double()
        sq += torch.einsum("nd,nd->n", x, x).double().sum()
    return sum_D, sq


_ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file straight from the tensors' memory.

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
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + data.numel()],
        }
        offset += data.numel()
        flat[name] = data
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for data in flat.values():
            data.numpy().tofile(fh)


class _ShardBuffer:
    """Rows of one hook waiting for a full shard (float32, so statistics are exact)."""

    def __init__(self, d_in: int, shard_tokens: int) -> None:
        self.d_in = d_in
        self.size = shard_tokens
        self._new()

    def _new(self) -> None:
        self.acts = torch.empty(self.size, self.d_in, dtype=torch.float32)
        self.token_ids = torch.empty(self.size, dtype=torch.int32)
        self.sequence = torch.empty(self.size, dtype=torch.int64)
        self.position = torch.empty(self.size, dtype=torch.int32)
        self.fill = 0

    def add(self, acts: Tensor, token_ids: Tensor, sequence: Tensor, position: Tensor) -> int:
        """Copy as many rows as fit; returns how many were taken."""
        n = min(self.size - self.fill, acts.shape[0])
        s = slice(self.fill, self.fill + n)
        self.acts[s] = acts[:n]
        self.token_ids[s] = token_ids[:n]
        self.sequence[s] = sequence[:n]
        self.position[s] = position[:n]
        self.fill += n
        return n

    def take(self) -> dict[str, Tensor]:
        n = self.fill
        rows = {
            "activations": self.acts[:n],
            "token_ids": self.token_ids[:n],
            "sequence": self.sequence[:n],
            "position": self.position[:n],
        }
        self._new()
        return rows


def write_part_manifest(folder: Path, rank: int, n_shards: int) -> dict[str, Any]:
    """Rank `rank`'s shard list and statistic sums, read back from its shard files."""
    from safetensors import safe_open

    shards, total, stat_sum, sq = [], 0, None, 0.0
    for i in range(n_shards):
        with safe_open(str(folder / shard_name(rank, i)), "pt") as f:
            n = f.get_slice("token_ids").get_shape()[0]
            s = f.get_tensor("stat_sum")
            sq += float(f.get_tensor("stat_sq_norm")[0])
        stat_sum = s if stat_sum is None else stat_sum + s
        shards.append({"file": shard_name(rank, i), "n_rows": n})
        total += n
    part = {
        "rank": rank,
        "n_tokens": total,
        "shards": shards,
        "stat_sum": [] if stat_sum is None else stat_sum.tolist(),
        "stat_sq_norm": sq,
    }
    atomic_write_json(folder / part_name(rank), part)
    return part


def merge_manifest(folder: Path, base: dict[str, Any], world_size: int) -> bool:
    """Write manifest.json from all ranks' parts if every rank is done; True if written."""
    paths = [folder / part_name(r) for r in range(world_size)]
    if not all(p.is_file() for p in paths):
        return False
    parts = [json.loads(p.read_text()) for p in paths]
    n = sum(p["n_tokens"] for p in parts)
    sums = [torch.tensor(p["stat_sum"], dtype=torch.float64) for p in parts if p["n_tokens"]]
    mean = (torch.stack(sums).sum(0) / max(n, 1)).tolist() if sums else []
    manifest = {
        **base,
        "n_tokens": n,
        "shards": [s for p in parts for s in p["shards"]],
        "mean": mean,
        "mean_squared_norm": sum(p["stat_sq_norm"] for p in parts) / max(n, 1),
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return True


# -- the run --------------------------------------------------------------------------------


def cache_activations(
    cfg: CacheConfig, model: Any = None, rank: int | None = None, world_size: int | None = None
) -> CacheResult:
    """Cache cfg.hooks for cfg.text into cfg.out (resuming a killed run). See module doc.

    `model` may be passed to reuse an already loaded TransformerBridge; rank / world_size
    default to the torchrun environment.
    """
    from tqdm import tqdm

    from activations.hooks import ActivationCapture, check_hook_names, hook_widths

    start_time = time.perf_counter()
    env_rank, env_world = dist_info()
    rank = env_rank if rank is None else rank
    world = env_world if world_size is None else world_size
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside world size {world}")
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    if model is None:
        from activations.model import load_model

        model = load_model(cfg.model, device=device, dtype=DTYPES[cfg.model_dtype])
    device = next(model.parameters()).device
    names = check_hook_names(model, cfg.hooks)
    if cfg.text.context_size > model.cfg.n_ctx:
        raise UserError(
            f"context_size {cfg.text.context_size} exceeds the model's context {model.cfg.n_ctx}"
        )
    check_source(cfg.text)
    widths = hook_widths(model, names)
    itemsize = DTYPES[cfg.dtype].itemsize
    shard_tokens = cfg.shard_tokens or max(
        1024, SHARD_TARGET_BYTES // (max(widths.values()) * itemsize) // 1024 * 1024
    )
    _prepare_out(out, _fingerprint(cfg, shard_tokens, world), cfg.overwrite)
    folders = {n: hook_dir(out, n) for n in names}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    base = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": cfg.model,
        "dataset": to_dict(cfg.text),
        "dtype": cfg.dtype,
        "context_size": cfg.text.context_size,
        "drop_bos": cfg.drop_bos,
        "shard_tokens": shard_tokens,
        "world_size": world,
    }
    bases = {n: {**base, "hook_name": n, "d_in": widths[n]} for n in names}

    if all((folders[n] / part_name(rank)).is_file() for n in names):
        logger.info("rank %d of %s is already complete", rank, out)
        for n in names:
            merge_manifest(folders[n], bases[n], world)
        held = json.loads((folders[names[0]] / part_name(rank)).read_text())["n_tokens"]
        return CacheResult(out, folders, held, 0, time.perf_counter() - start_time)

    done_shards = min(_complete_shards(folders[n], rank) for n in names)
    done_rows = done_shards * shard_tokens
    plan = _plan(cfg)
    n_contexts = plan.max_contexts
    if n_contexts is None:
        n_contexts = _count_contexts(cfg, model.tokenizer)
    total = None if n_contexts is None else _rank_rows(plan, n_contexts, rank, world)
    bytes_per_row = sum(w * itemsize + META_BYTES_PER_ROW for w in widths.values())
    if total is not None:
        check_free_disk(out, max(total - done_rows, 0) * bytes_per_row)
    else:
        logger.warning("dataset size unknown: free disk is checked before each shard only")
    if done_rows:
        logger.info("resuming after %d complete shard(s): %d rows per hook", done_shards, done_rows)

    skip_contexts, skip_rows = divmod(done_rows, plan.rows_per_context)
    p0 = 1 if cfg.drop_bos else 0
    T = cfg.text.context_size
    positions = torch.arange(p0, T, dtype=torch.int32)
    buffers = {n: _ShardBuffer(widths[n], shard_tokens) for n in names}
    # One metadata key only: safetensors keeps metadata in a hash map, so with two keys the
    # header order (and the bytes of a resumed shard) could differ from run to run.
    writer = _ShardWriter(DTYPES[cfg.dtype], {"format": FORMAT})
    next_shard = done_shards
    new_rows = 0
    bar = tqdm(total=total, initial=done_rows, unit="tok", unit_scale=True, desc="caching")
    try:
        with ActivationCapture(model, names) as capture:
            contexts = context_batches(
                cfg.text,
                model.tokenizer,
                rank=rank,
                world_size=world,
                start=skip_contexts,
                max_contexts=plan.max_contexts,
            )
            # Tokenize on a thread, ahead of the forward pass (issue 4: overhead <= 10%).
            for batch in in_background(contexts, depth=8):
                acts = capture(batch.tokens.to(device))
                S = batch.tokens.shape[0]
                # The rows kept are one range: a resume skips a prefix of the first batch,
                # max_tokens cuts the end of the global last context, which ends its batch.
                lo, hi = skip_rows, S * (T - p0)
                skip_rows = 0
                if (
                    plan.max_contexts is not None
                    and int(batch.sequence[-1]) == plan.max_contexts - 1
                ):
                    hi -= plan.rows_per_context - plan.last_rows
                meta = {
                    "token_ids": batch.tokens[:, p0:].reshape(-1)[lo:hi].to(torch.int32),
                    "sequence": batch.sequence[:, None].expand(S, T - p0).reshape(-1)[lo:hi],
                    "position": positions.expand(S, T - p0).reshape(-1)[lo:hi],
                }
                rows = {
                    n: a[:, p0:].reshape(S * (T - p0), -1)[lo:hi].float().cpu()
                    for n, a in acts.items()
                }
                n_rows = max(hi - lo, 0)
                taken = 0
                while taken < n_rows:
                    step = 0
                    for n in names:
                        step = buffers[n].add(
                            rows[n][taken:],
                            meta["token_ids"][taken:],
                            meta["sequence"][taken:],
                            meta["position"][taken:],
                        )
                    taken += step
                    if buffers[names[0]].fill == shard_tokens:
                        for n in names:
                            writer.submit(
                                folders[n] / shard_name(rank, next_shard), buffers[n].take()
                            )
                        next_shard += 1
                new_rows += n_rows
                bar.update(n_rows)
        if buffers[names[0]].fill:
            for n in names:
                writer.submit(folders[n] / shard_name(rank, next_shard), buffers[n].take())
            next_shard += 1
    finally:
        bar.close()
        writer.close()

    held = 0
    for n in names:
        held = write_part_manifest(folders[n], rank, next_shard)["n_tokens"]
        merged = merge_manifest(folders[n], bases[n], world)
    if world > 1 and not merged:
        logger.info("rank %d done; the last rank to finish writes the merged manifest", rank)
    seconds = time.perf_counter() - start_time
    logger.info("cached %d tokens x %d hook(s) in %.1f s into %s", held, len(names), seconds, out)
    return CacheResult(out, folders, held, new_rows, seconds)
