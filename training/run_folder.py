"""The run folder of `sae train`: who may write it, and what --resume and --overwrite do.

A run folder (`TrainConfig.out_dir`) holds config.json (the options and what was derived from
the data), metrics.jsonl, checkpoint/state.pt, plots/ and one dictionary folder per member.
`sae train` holds it for the whole run (`sae.locks.hold_folder`), and starts in it only if it
holds nothing worth keeping:

- a folder with a checkpoint or a saved dictionary is refused unless `--resume` (continue it:
  the saved options must match, `check_resume_config` names the first that differs) or
  `--overwrite` (its run files are removed first);
- a run that stopped before its first checkpoint left nothing to resume and is started over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sae.dataclass_cli import to_dict
from sae.errors import UserError
from sae.locks import hold_folder
from training.checkpoint import CHECKPOINT_FILE
from training.metrics import METRICS_FILE

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, "checkpoint", "plots", "wandb_id.txt", "wandb")
"""What a run writes besides its dictionaries (`--overwrite` removes these)."""

RESUME_MAY_CHANGE = frozenset(
    {
        "total_tokens",  # training longer (or shorter) continues the same run
        "out_dir",
        "device",
        "checkpoint_every_steps",
        "sparse_grad",  # the same gradients either way
        "logging.progress",
        "logging.plots",
        "logging.wandb",
        "logging.wandb_project",
    }
)
"""Options a resumed run may set differently: where, how and how long it runs."""


def run_config(names: Sequence[str], cfgs: Sequence[Any]) -> dict[str, Any]:
    """The options part of config.json: a single run's TrainConfig, or a sweep's per member."""
    if len(cfgs) == 1:
        return to_dict(cfgs[0])
    return {"members": {n: to_dict(c) for n, c in zip(names, cfgs, strict=True)}}


def write_run_config(
    out_dir: Path, members: Sequence[Any], config: dict[str, Any], run: dict[str, Any]
) -> None:
    """config.json: the run's configuration and what was derived from the data (`run`, plus
    each member's resolved schedules)."""
    from sae.atomic import atomic_write_json

    resolved = {
        **run,
        "members": {
            m.name: {
                "d_sae": m.dictionary.d_sae,
                "architecture": m.dictionary.cfg.architecture,
                "resample": m.cfg.resample_enabled(),
                "resample_points": m.cfg.resample_points(),
                "resample_window_tokens": m.cfg.resample_window_tokens(),
                "density_window_tokens": m.cfg.density_window_tokens(),
            }
            for m in members
        },
    }
    atomic_write_json(out_dir / "config.json", {**config, "resolved": resolved})


def _is_main() -> bool:
    """The process that writes the run folder: rank 0 of a torchrun job, or the only one."""
    return int(os.environ.get("RANK", 0)) == 0


@contextlib.contextmanager
def own_run_folder(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir` for `sae train` (the main process of a torchrun job writes it; other
    ranks only read, so they take no lock)."""
    if not _is_main():
        yield
        return
    with hold_folder(out_dir, "sae train"):
        yield


def _saved_config(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); move it away or --overwrite") from e
    return data if isinstance(data, dict) else None


def _member_names(saved: dict[str, Any] | None) -> list[str]:
    if saved is None:
        return []
    return list(saved.get("resolved", {}).get("members", {}))


def prepare_run_folder(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding a run (unless resume/overwrite); with overwrite, clear it.
    Every rank of a torchrun job refuses alike; only the main one removes files."""
    if resume and overwrite:
        raise UserError(
            "--resume continues the run in --out-dir, --overwrite replaces it: not both"
        )
    out_dir = Path(out_dir)
    if resume:
        return  # the trainer checks the checkpoint and the saved options
    saved = _saved_config(out_dir)
    members = _member_names(saved)
    finished = [m for m in members if (out_dir / m / "cfg.json").is_file()]
    has_checkpoint = (out_dir / CHECKPOINT_FILE).is_file()
    if (finished or has_checkpoint) and not overwrite:
        if finished:
            what = f"a finished run (dictionaries {', '.join(finished)})"
            hint = "pass --overwrite to replace it"
        else:
            what = "an unfinished run with a checkpoint"
            hint = "pass --resume to continue it or --overwrite to replace it"
        raise UserError(f"{out_dir} holds {what}; {hint}, or pick another --out-dir")
    if not _is_main():
        return
    removed = [n for n in (*RUN_FILES, *members) if (out_dir / n).exists()]
    for name in removed:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if removed:
        logger.info("starting over in %s (removed %s)", out_dir, ", ".join(removed))


def _show(value: Any) -> str:
    text = "not set" if value is _MISSING else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


_MISSING = object()


def first_difference(
    saved: dict[str, Any], new: dict[str, Any], prefix: str = ""
) -> tuple[str, Any, Any] | None:
    """(dotted field, saved value, new value) of the first option that differs, in the new
    config's field order; options in `RESUME_MAY_CHANGE` are skipped."""
    for key in [*new, *(k for k in saved if k not in new)]:
        path = f"{prefix}{key}"
        # A sweep nests each member's options under members.<name>.
        field = (
            path.split(".", 2)[2] if path.startswith("members.") and path.count(".") >= 2 else path
        )
        if field in RESUME_MAY_CHANGE:
            continue
        a, b = saved.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{path}.")
            if found is not None:
                return found
        elif a != b:
            return path, a, b
    return None


def check_resume_config(out_dir: Path, config: dict[str, Any]) -> None:
    """UserError naming the first option that differs from the run saved in `out_dir` (its
    config.json without the derived "resolved" part); nothing saved, nothing to check."""
    saved = _saved_config(Path(out_dir))
    if saved is None:
        return
    saved = {k: v for k, v in saved.items() if k != "resolved"}
    found = first_difference(saved, config)
    if found is not None:
        path, a, b = found
        raise UserError(
            f"cannot resume {out_dir}: {path} differs (saved {_show(a)}, now {_show(b)}); "
            "resume with the saved value, or start over with --overwrite"
        )
