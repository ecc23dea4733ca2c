"""Parallel `sae train` children (sae/jobs.py): progress from their metrics, failures named."""

from __future__ import annotations

import json

import pytest

from sae.errors import UserError
from sae.jobs import TrainJob, run_parallel, tokens_done


def test_tokens_done_reads_the_last_logged_tokens_and_skips_a_half_written_row(tmp_path):
    assert tokens_done(tmp_path) == 0
    rows = [{"step": 1, "tokens": 1024}, {"step": 2, "tokens": 2048}]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 3, "tok'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert tokens_done(tmp_path) == 2048


def test_a_failing_child_is_named_with_its_last_log_line(tmp_path):
    missing = tmp_path / "no-cache"
    jobs = [
        TrainJob(
            name,
            ["train", "--cache", str(missing), "--out-dir", str(tmp_path / name)],
            tmp_path / name,
            1000,
        )
        for name in ("a", "b")
    ]
    with pytest.raises(UserError) as err:
        run_parallel(jobs, poll_s=0.1)
    message = str(err.value)
    assert message.startswith("training a failed (exit 2)") and str(missing) in message
    assert str(tmp_path / "a.log") in message and (tmp_path / "b.log").is_file()
