"""Small text fixtures shared by the activation and training tests."""

from __future__ import annotations

import random
from pathlib import Path

from tests.conftest import TINY_TEXT

WORDS = ["def", "return", "import", "class", "self", "x", "y", "for", "in", "range", "print", "42"]


def make_docs(folder: Path, n_docs: int, seed: int = 0, words: int = 40) -> Path:
    """`n_docs` small .txt documents of code-like words (deterministic for a seed)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words)))
        (folder / f"doc{i:04d}.txt").write_text(TINY_TEXT[i % len(TINY_TEXT)] + body + "\n")
    return folder
