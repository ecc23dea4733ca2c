"""Training checkpoints: everything needed to continue a run exactly, written atomically.

`<run>/checkpoint/state.pt` holds every member's weights, optimizer moments, counters and
generator, the step and token counts, the input scale, the torch RNG states, the data
source's position (its `state_dict()`, or the number of batches consumed for sources without
one), and batches already read but not yet trained on. It is separate from the saved
dictionaries (sae/io.py), which hold no training state.

Only tensors, numbers, strings and containers are stored, so loading uses
`torch.load(weights_only=True)`: a checkpoint cannot execute code. It is written under a
temporary name and renamed (`sae.atomic`), after checking that its tensors' bytes are free: a
full disk is one line naming the file, and the previous checkpoint stays valid.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sae.atomic import atomic_path
from sae.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint/state.pt"
FORMAT = 1


def checkpoint_path(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINT_FILE


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested state (what torch.save writes, less a little framing)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(out_dir: Path, state: dict[str, Any]) -> Path:
    path = checkpoint_path(out_dir)
    with (
        atomic_path(path, expected_bytes=tensor_bytes(state) + 65536) as tmp,
        open(tmp, "wb") as fh,
    ):
        # Through a Python file, so a full disk raises OSError(ENOSPC), not torch's opaque
        # "unexpected pos" RuntimeError.
        torch.save({"format": FORMAT, **state}, fh)
    logger.info("checkpoint saved at step %d (%s)", state.get("step", -1), path)
    return path


def load_checkpoint(out_dir: Path) -> dict[str, Any]:
    path = checkpoint_path(out_dir)
    if not path.is_file():
        raise UserError(f"cannot resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which file, not a torch trace
        raise UserError(f"cannot resume: {path} is not a readable checkpoint ({e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"cannot resume: {path} has an unknown checkpoint format")
    return state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
