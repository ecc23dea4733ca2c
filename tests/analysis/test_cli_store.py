"""`sae analyze` owns its feature store while it writes: one writer, another dictionary's store
refused unless --overwrite, a full disk one line with the previous analysis kept."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from analysis.store import FeatureStore
from sae.cli import main
from sae.locks import hold_folder
from tests.analysis.test_analyze import make_dict


@pytest.fixture
def setup(tiny_lm_dir: Path, tmp_path: Path) -> tuple[list[str], Path]:
    from tests.conftest import TINY_TEXT

    text = tmp_path / "text"
    text.mkdir()
    for i, doc in enumerate(TINY_TEXT):
        (text / f"doc{i}.py").write_text(doc)
    d = make_dict()
    d.cfg.model_name = str(tiny_lm_dir)
    d.save(tmp_path / "dict")
    flags = ["--text", str(text), "--context-size", "16", "--tokens", "96", "--n-top", "2"]
    return flags, tmp_path / "dict"


def _analyze(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(["analyze", *argv])
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sae ")]


def test_a_second_analyze_of_a_held_store_is_refused(setup, capsys) -> None:
    flags, d = setup
    with hold_folder(d / "analysis", "sae analyze"):
        code, lines = _analyze([str(d), *flags], capsys)
    assert code == 2 and lines == [
        f"sae analyze: error: {d / 'analysis'} is in use by `sae analyze` (pid {os.getpid()}); "
        "wait for it to finish or pick another folder"
    ]
    assert not (d / "analysis").exists()


def test_a_store_of_another_dictionary_is_refused_unless_overwrite(setup, tmp_path, capsys):
    flags, d = setup
    assert _analyze([str(d), *flags], capsys) == (0, [])
    with FeatureStore.open(d) as store:
        store.add_label(1, "kept across re-analysis", "tester")
    assert _analyze([str(d), *flags], capsys) == (0, [])  # the same dictionary again
    other = make_dict(d_sae=48, seed=1)
    with FeatureStore.open(d, readonly=True) as store:
        other.cfg.model_name = store.meta().model_name
    other.save(tmp_path / "other")
    argv = [str(tmp_path / "other"), *flags, "--out", str(d / "analysis")]
    code, lines = _analyze(argv, capsys)
    assert code == 2 and len(lines) == 1
    assert f"{d / 'analysis'} holds the analysis of another dictionary" in lines[0]
    assert "32 features" in lines[0] and "--overwrite" in lines[0]
    with FeatureStore.open(d, readonly=True) as store:
        assert store.meta().d_sae == 32 and store.labels(1)
    assert _analyze([*argv, "--overwrite"], capsys) == (0, [])
    with FeatureStore.open(d, readonly=True) as store:
        assert store.meta().d_sae == 48 and store.meta().generation == 1
        assert store.labels(1) == []


@pytest.mark.parametrize("where", ["arrays", "sqlite"])
def test_a_full_disk_while_storing_is_one_line_and_keeps_the_previous_analysis(
    setup, capsys, monkeypatch, where
) -> None:
    flags, d = setup
    assert _analyze([str(d), *flags], capsys) == (0, [])
    if where == "arrays":

        def full(file, arr, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(np, "save", full)
    else:

        def full_database(self, arrays):
            raise sqlite3.OperationalError("database or disk is full")  # what SQLITE_FULL says

        monkeypatch.setattr(FeatureStore, "replace_statistics", full_database)
    code, lines = _analyze([str(d), *flags, "--tokens", "160"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("sae analyze: error: the disk filled while writing")
    assert lines[0].split(": it needs ")[0].endswith("features.sqlite" if where == "sqlite" else "")
    assert " bytes), " in lines[0] and "needs more than" not in lines[0] and " free;" in lines[0]
    monkeypatch.undo()
    with FeatureStore.open(d, readonly=True) as store:
        assert store.meta().n_tokens == 96 and store.meta().generation == 1
        assert sum(len(store.top_examples(f)) for f in range(32)) > 0  # old arrays still read
    assert not list((d / "analysis").glob(".*tmp"))  # no half-written generation
