"""Readers for dictionary layouts, ours and other libraries', chosen by the files present.

Each foreign format is one small module with `detect(root) -> bool` and
`load(root) -> Dictionary` (on CPU, validated, with the source recorded in
cfg.provenance["source_format"]). Our own format is read by sae.io.load_native.
"""

from __future__ import annotations

from pathlib import Path

from sae.base import Dictionary
from sae.errors import DictionaryFormatError

LAYOUTS = (
    "ours: cfg.json + sae.safetensors; SAELens: cfg.json + sae_weights.safetensors; "
    "sparsify: cfg.json + sae.safetensors; Gemma Scope: params.npz"
)


def _looks_like_dictionary(p: Path) -> bool:
    return (p / "params.npz").is_file() or (p / "cfg.json").is_file()


def load_any(root: Path) -> Dictionary:
    """Load the dictionary at `root` (a directory, or a file inside one) in whatever layout."""
    from sae import io

    if root.is_file():
        root = root.parent
    if not root.is_dir():
        raise DictionaryFormatError(root, None, "no such directory")
    if (root / io.CFG_FILE).is_file() and (root / io.WEIGHTS_FILE).is_file():
        return io.load_native(root)
    if (root / io.CFG_FILE).is_file():
        # A cfg.json without weights: report the missing file of our own format.
        return io.load_native(root)
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and _looks_like_dictionary(p))
    hint = f"; it holds dictionaries in subfolders: {', '.join(subdirs[:10])}" if subdirs else ""
    raise DictionaryFormatError(root, None, f"not a dictionary directory ({LAYOUTS}){hint}")
