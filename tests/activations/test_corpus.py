"""The bundled corpus: what is in it, and a split that is deterministic and disjoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from activations.corpus import (
    VALIDATION_PER_MILLE,
    corpus_files,
    iter_documents,
    iter_files,
    split_of,
)


def _write(root: Path, relative: str, data: bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def fake_stdlib(tmp_path: Path) -> Path:
    """A small stand-in for the stdlib with one file of every excluded kind."""
    for i in range(60):
        _write(tmp_path, f"pkg{i % 3}/mod_{i}.py", f"x_{i} = {i}\n".encode())
    _write(tmp_path, "site-packages/numpy/core.py", b"third = 'party'\n")
    _write(tmp_path, "dist-packages/apt.py", b"third = 'party'\n")
    _write(tmp_path, "pydoc_data/topics.py", b"topics = {'a': 'long prose'}\n")
    _write(
        tmp_path,
        "encodings/cp_fake.py",
        b'""" Python Character Mapping Codec generated from X with gencodec.py.\n"""\n',
    )
    _write(tmp_path, "encodings/utf_fake.py", b"import codecs\n")
    _write(tmp_path, "_sysconfigdata__linux.py", b"build_time_vars = {}\n")
    _write(tmp_path, "latin1.py", "s = 'caf\u00e9'\n".encode("latin-1"))
    _write(tmp_path, "crlf.py", b"a = 1\r\nb = 2\r\n")
    _write(tmp_path, "empty.py", b"\n\n")
    _write(tmp_path, "notes.txt", b"not python\n")
    return tmp_path


def test_exclusions_and_normalisation(fake_stdlib: Path) -> None:
    docs = {d.path: d.text for s in ("train", "validation") for d in iter_files(s, fake_stdlib)}
    assert "encodings/utf_fake.py" in docs
    assert docs["crlf.py"] == "a = 1\nb = 2\n"
    for excluded in (
        "site-packages/numpy/core.py",
        "dist-packages/apt.py",
        "pydoc_data/topics.py",
        "encodings/cp_fake.py",
        "_sysconfigdata__linux.py",
        "latin1.py",
        "empty.py",
        "notes.txt",
    ):
        assert excluded not in docs
    assert len(docs) == 60 + 2  # the modules, utf_fake and crlf


def test_split_is_a_function_of_the_path_only(fake_stdlib: Path, tmp_path_factory) -> None:
    train = [d.path for d in iter_files("train", fake_stdlib)]
    val = [d.path for d in iter_files("validation", fake_stdlib)]
    assert train == sorted(train) and val == sorted(val)
    assert not set(train) & set(val)
    assert all(split_of(p) == "train" for p in train)
    assert all(split_of(p) == "validation" for p in val)
    # The same relative paths under another root land in the same splits, in the same order.
    other = tmp_path_factory.mktemp("other_root")
    for d in iter_files("validation", fake_stdlib):
        _write(other, d.path, d.text.encode())
    assert [d.path for d in iter_files("validation", other)] == val
    assert list(iter_documents("validation", other)) == [
        d.text for d in iter_files("validation", fake_stdlib)
    ]


def test_split_of_is_stable_and_near_five_percent() -> None:
    # Pinned values: the split must not change between versions of this project, or the
    # bundled model's validation loss would silently be measured on training data.
    for path in ("aifc.py", "asyncio/futures.py", "collections/__init__.py"):
        assert split_of(path) == "validation", path
    for path in ("argparse.py", "json/decoder.py", "asyncio/tasks.py"):
        assert split_of(path) == "train", path
    paths = [f"pkg/module_{i}.py" for i in range(4000)]
    share = sum(split_of(p) == "validation" for p in paths) / len(paths)
    assert abs(share - VALIDATION_PER_MILLE / 1000) < 0.015


def test_real_stdlib_corpus() -> None:
    files = corpus_files()
    assert not any("site-packages" in p or p.startswith("pydoc_data/") for p in files)
    assert "argparse.py" in files
    candidates = [p for p in files if split_of(p) == "validation"]
    val = [d.path for d in iter_files("validation")]  # reads only ~5% of the files
    assert 10 < len(val) <= len(candidates) < 0.1 * len(files)
    assert set(val) <= set(candidates)
    first = next(iter_documents("validation"))
    assert isinstance(first, str) and first.strip()


def test_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        next(iter_documents("test"))  # type: ignore[arg-type]
