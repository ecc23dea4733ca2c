"""The package metadata builds without deprecation warnings (what `pip install -e .` prints)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_metadata_builds_without_setuptools_warnings(tmp_path: Path) -> None:
    # The build backend's own metadata step, which `pip install -e .` runs; offline.
    code = (
        "import setuptools.build_meta as backend; "
        f"print(backend.prepare_metadata_for_build_editable({str(tmp_path)!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "Deprecat" not in output and "Warning" not in output, output
    metadata = next(tmp_path.glob("*.dist-info")) / "METADATA"
    assert "License-Expression: MIT" in metadata.read_text()
