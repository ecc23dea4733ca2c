"""Readers for dictionary layouts, ours and other libraries', chosen by the files present.

Each foreign format is one small module with `detect(root) -> bool` and
`load(root) -> Dictionary` (on CPU, validated, with the source recorded in
cfg.provenance["source_format"]). Our own format is read by sae.io.load_native.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sae.base import Dictionary
from sae.errors import DictionaryFormatError

log = logging.getLogger(__name__)

LAYOUTS = (
    "ours: cfg.json + sae.safetensors; SAELens: cfg.json + sae_weights.safetensors; "
    "sparsify: cfg.json + sae.safetensors; Gemma Scope: params.npz"
)


def _looks_like_dictionary(p: Path) -> bool:
    return (p / "params.npz").is_file() or (p / "cfg.json").is_file()


def load_any(root: Path) -> Dictionary:
    """Load the dictionary at `root` (a directory, or a file inside one) in whatever layout."""
    from sae import io
    from sae.formats import gemmascope, saelens, sparsify

    if root.is_file():
        root = root.parent
    if not root.is_dir():
        raise DictionaryFormatError(root, None, "no such directory")
    d: Dictionary
    if gemmascope.detect(root):
        d = gemmascope.load(root)
    elif saelens.detect(root):
        d = saelens.load(root)
    elif sparsify.detect(root):
        d = sparsify.load(root)
    elif (root / io.CFG_FILE).is_file():
        d = io.load_native(root)  # reports a missing sae.safetensors or bad field by name
    else:
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and _looks_like_dictionary(p))
        hint = (
            f"; it holds dictionaries in subfolders: {', '.join(subdirs[:10])}" if subdirs else ""
        )
        raise DictionaryFormatError(root, None, f"not a dictionary directory ({LAYOUTS}){hint}")
    log.debug("loaded %s (%s)", root, d.cfg.provenance.get("source_format", "ours"))
    return d
