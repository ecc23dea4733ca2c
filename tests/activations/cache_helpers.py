"""Shared pieces of the activation-cache tests: a tiny model and a folder of small documents."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

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


@pytest.fixture(scope="module", name="tiny_model")
def tiny_model_fixture(tiny_lm_dir: Path) -> Any:
    from activations.model import load_model

    return load_model(str(tiny_lm_dir))


@pytest.fixture(autouse=True, scope="module", name="one_torch_thread")
def one_torch_thread_fixture():
    """Tiny matmuls on a shared 2-core box: a second OpenMP thread only adds spin-waiting
    (measured 17x slower under load), so these modules run torch on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
