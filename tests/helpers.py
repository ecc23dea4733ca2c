"""Small text fixtures shared by the activation and training tests."""

from __future__ import annotations

import random
import shutil
import subprocess
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


def run_on_tmpfs(
    mount: Path, size: str, argv: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str] | None:
    """Run `argv` with a fresh tmpfs of `size` (e.g. "400k") mounted at `mount`, in a private
    user and mount namespace (`unshare -rm`: no root needed, nothing visible outside). None
    where this system does not allow that, so a real full disk can be tested where it can."""
    if shutil.which("unshare") is None:
        return None
    mount.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(
        ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
    )
    if probe.returncode != 0:
        return None
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", size, str(mount), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
