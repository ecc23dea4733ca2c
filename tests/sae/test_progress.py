"""Progress bars: redrawn in place on a terminal, plain whole lines in a log."""

from __future__ import annotations

import io
import os

import pytest

from sae import progress
from sae.progress import progress_bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_and_a_terminal_gets_the_bar(monkeypatch) -> None:
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)  # a line for every update
    log = io.StringIO()
    bar = progress_bar(total=300, desc="train", unit="step", file=log, dynamic_ncols=True)
    for _ in range(300):
        bar.update(1)
        bar.set_postfix({"loss": "0.123", "l0": "31.9"}, refresh=False)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) > 10 and max(map(len, lines)) < 120
    assert lines[-1].startswith("train: 100% 300/300") and "loss=0.123" in lines[-1]

    tty = _Tty()
    bar = progress_bar(total=3, desc="train", file=tty)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in tty.getvalue() and "|" in tty.getvalue()  # tqdm's own bar


def test_a_log_gets_one_line_per_interval_not_one_per_update(monkeypatch) -> None:
    log = io.StringIO()
    for _ in progress_bar(range(10_000), desc="loop", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert 1 <= len(lines) <= 3, lines  # the first, maybe one on the way, the last
    assert lines[-1].startswith("loop: 100% 10000/10000")


@pytest.mark.parametrize("total", [None, 5])
def test_unknown_length_and_disabled_bars(total) -> None:
    log = io.StringIO()
    bar = progress_bar(total=total, desc="count", unit="ctx", file=log)
    bar.update(5)
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("count: ")
    quiet = io.StringIO()
    bar = progress_bar(total=total, file=quiet, disable=True)
    bar.update(5)
    bar.close()
    assert quiet.getvalue() == ""


def test_library_bars_are_quiet_in_a_log_only(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr("sys.stderr", _Tty())
    progress.quiet_library_bars()
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    monkeypatch.setattr("sys.stderr", io.StringIO())
    progress.quiet_library_bars()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
