"""Where training numbers go: `metrics.jsonl` in the run folder always, W&B when enabled.

metrics.jsonl is append-only, one JSON object per line ({"step", "tokens", "member", ...}).
Each line goes to the file in one write of the whole line (O_APPEND), and a write that fails
(a full disk) is cut back off, so the file never holds a blank or partial line of ours; a
crash in the middle of a write can leave at most one partial last line, which `read_metrics`
skips and reopening cuts off. On resume the lines past the checkpoint are dropped (rewritten
atomically), so the file matches an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from sae.atomic import atomic_write_text, free_bytes
from sae.errors import DiskFullError

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def to_float(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item())
    return float(v)


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a partial last line from a crash
    return rows


def _open_for_append(path: Path, truncate: bool) -> int:
    """An O_APPEND descriptor of `path`; a partial last line (a crash mid-write) is cut off."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
    fd = os.open(path, flags, 0o666)
    size = os.fstat(fd).st_size
    if size:
        with open(path, "rb") as fh:
            fh.seek(size - 1)
            torn = fh.read(1) != b"\n"
        if torn:
            os.ftruncate(fd, path.read_bytes().rfind(b"\n") + 1)
            logger.warning("%s: cut off a partial last line left by a crash", path)
    return fd


def append_line(fd: int, path: Path, line: str) -> None:
    """Append one whole line; on failure the file is cut back to where it was."""
    data = line.encode()
    start = os.fstat(fd).st_size
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    except OSError as e:
        os.ftruncate(fd, start)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(path, len(data), free_bytes(path), during_write=True) from e
        raise


def truncate_metrics(out_dir: Path, last_step: int) -> None:
    """Keep only rows up to `last_step` (used when resuming from a checkpoint)."""
    rows = [r for r in read_metrics(out_dir) if r.get("step", 0) <= last_step]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_text(Path(out_dir) / METRICS_FILE, text)


class MetricsLogger:
    """Writes rows to metrics.jsonl and, if enabled, to a W&B run (offline mode works)."""

    def __init__(
        self,
        out_dir: Path,
        enabled: bool = True,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
        resume: bool = False,
    ) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self._fd: int | None = None
        self._wandb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = _open_for_append(self.path, truncate=not resume)
        if wandb_project is not None:
            import wandb

            mode = os.environ.get("WANDB_MODE", "online")
            # One run per hook when training from a model: several W&B runs open at once in
            # one process, which wandb >= 0.19.10 allows (older versions end the previous one).
            version = tuple(int(n) for n in re.findall(r"\d+", wandb.__version__)[:3])
            several = {"reinit": "create_new"} if version >= (0, 19, 10) else {}
            self._wandb = wandb.init(
                **several,  # type: ignore[arg-type]
                project=wandb_project,
                dir=str(out_dir),
                config=config or {},
                mode=mode,  # type: ignore[arg-type]
                resume="allow" if resume else None,
                id=_wandb_id(out_dir, resume),
            )
            logger.info("W&B run %s (mode %s)", self._wandb.id, mode)

    def log(self, row: dict[str, Any], member: str, multi: bool) -> None:
        if not self.enabled or self._fd is None:
            return
        clean = {k: (to_float(v) if not isinstance(v, str) else v) for k, v in row.items()}
        clean = {k: v for k, v in clean.items() if not (isinstance(v, float) and math.isnan(v))}
        append_line(self._fd, self.path, json.dumps({**clean, "member": member}) + "\n")
        if self._wandb is not None:
            prefix = f"{member}/" if multi else ""
            data = {f"{prefix}{k}": v for k, v in clean.items() if k not in ("step",)}
            self._wandb.log(data, step=int(clean["step"]))

    def log_histogram(self, member: str, values: torch.Tensor, step: int, multi: bool) -> None:
        if self._wandb is None:
            return
        import wandb

        prefix = f"{member}/" if multi else ""
        log10 = torch.log10(values.clamp_min(1e-10)).tolist()
        self._wandb.log({f"{prefix}log10_feature_density": wandb.Histogram(log10)}, step=step)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_id(out_dir: Path, resume: bool) -> str:
    """A stable run id stored in the run folder, so a resumed run continues the same W&B run."""
    import secrets

    path = Path(out_dir) / "wandb_id.txt"
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    atomic_write_text(path, run_id)
    return run_id
