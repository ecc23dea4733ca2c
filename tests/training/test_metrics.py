"""metrics.jsonl holds whole lines only: a torn line is cut off, a failed write undone."""

from __future__ import annotations

import errno
import os

import pytest

from sae.errors import DiskFullError
from training.metrics import METRICS_FILE, MetricsLogger, read_metrics


def test_lines_are_whole_and_a_torn_last_line_is_cut_off_on_reopening(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log({"step": 1, "loss": 0.5}, "dictionary", multi=False)
    log.close()
    path = tmp_path / METRICS_FILE
    with open(path, "a") as fh:
        fh.write('{"step": 2, "lo')  # a crash in the middle of a line
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    log = MetricsLogger(tmp_path, resume=True)
    log.log({"step": 2, "loss": 0.4}, "dictionary", multi=False)
    log.close()
    text = path.read_text()
    assert text.count("\n") == 2 and text.endswith("}\n") and "\n\n" not in text
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    MetricsLogger(tmp_path).close()  # a fresh run starts a fresh file
    assert path.read_text() == ""


def test_a_full_disk_undoes_the_partial_line(tmp_path, monkeypatch):
    log = MetricsLogger(tmp_path)
    log.log({"step": 1}, "dictionary", multi=False)
    before = (tmp_path / METRICS_FILE).read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 10:
            return real_write(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFullError, match=r"the disk filled while writing .*metrics.jsonl"):
        log.log({"step": 2}, "dictionary", multi=False)
    monkeypatch.setattr(os, "write", real_write)
    assert (tmp_path / METRICS_FILE).read_bytes() == before
    log.log({"step": 3}, "dictionary", multi=False)
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 3]
