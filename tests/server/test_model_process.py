"""The model in its own process answers exactly what the in-process worker answers (text
activations, top features, steering, and their errors), sheds beyond max_queue, and goes
away with the server."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import API_KEY, make_settings, running_server
from tests.server.helpers import assert_error

TEXT = "import os\nprint(os.getcwd())\n"
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/api/activations", {"text": TEXT, "features": ["mlp0/3", "bare/4", "mlp0/127"]}),
    ("/api/top-features", {"text": TEXT, "dictionary": "mlp0", "k": 3, "limit": 5}),
    ("/api/top-features", {"text": "x = 1", "dictionary": "bare"}),
    (
        "/api/steer",
        {
            "prompt": "def f(",
            "interventions": [
                {"feature": "mlp0/3", "strength": 4},
                {"feature": "bare/1", "strength": -2},
            ],
            "max_new_tokens": 5,
        },
    ),
    (
        "/api/steer",
        {
            "prompt": "x",
            "interventions": [{"feature": "mlp0/2", "mode": "clamp", "strength": 3}],
            "max_new_tokens": 4,
            "temperature": 0.7,
            "seed": 3,
        },
    ),
]
ERRORS: list[tuple[str, dict[str, Any], int, str]] = [
    ("/api/activations", {"text": "x = 1\n" * 40, "features": ["mlp0/1"]}, 422, "limit_exceeded"),
    ("/api/activations", {"text": "a", "features": ["mlp0/128"]}, 404, "not_found"),
    ("/api/activations", {"text": "a", "features": ["nope/1"]}, 404, "not_found"),
    ("/api/top-features", {"text": "a", "dictionary": "nope"}, 404, "not_found"),
    (
        "/api/steer",
        {
            "prompt": "a",
            "interventions": [{"feature": "mlp0/1", "strength": 1}],
            "max_new_tokens": 17,
        },
        422,
        "limit_exceeded",
    ),
]


@pytest.mark.slow
def test_model_process_answers_as_the_thread_does(dict_dirs: dict[str, Path], state: Any) -> None:
    from server.app import create_app
    from server.deps import load_state

    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=120) as c, running_server(create_app(state=state)) as url:
        want = [c.post(url + path, json=body, headers=auth).json() for path, body in REQUESTS]
    proc_state = load_state(make_settings(dict_dirs, worker_process=True))
    child = proc_state.model_process
    assert child is not None and child.pid is not None
    try:
        with httpx.Client(timeout=120) as c, running_server(create_app(state=proc_state)) as url:
            for (path, body), expected in zip(REQUESTS, want, strict=True):
                r = c.post(url + path, json=body, headers=auth)
                assert r.status_code == 200, r.text
                got = r.json()
                assert got.keys() == expected.keys()
                if path == "/api/activations":
                    for a, b in zip(got["features"], expected["features"], strict=True):
                        assert a["values"] == pytest.approx(b["values"], abs=1e-5)
                    got["features"] = expected["features"]
                if path == "/api/top-features":
                    for a, b in zip(got["overall"], expected["overall"], strict=True):
                        assert a["max_value"] == pytest.approx(b["max_value"], abs=1e-5)
                        assert a["feature_id"] == b["feature_id"]
                    got["overall"] = expected["overall"]
                    got["per_token"] = [[f["feature_id"] for f in t] for t in got["per_token"]]
                    expected = dict(
                        expected,
                        per_token=[[f["feature_id"] for f in t] for t in expected["per_token"]],
                    )
                assert got == expected, path
            for path, body, status, code in ERRORS:
                assert_error(c.post(url + path, json=body, headers=auth), status, code)
            assert c.get(url + "/readyz").json()["queue"] == 0
    finally:
        proc_state.close()
    assert not child._proc.is_alive()


@pytest.mark.slow
def test_model_process_that_cannot_load_is_one_line(
    dict_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from sae.errors import UserError
    from server.model_process import ModelProcess

    settings = make_settings(dict_dirs, dictionaries=[str(tmp_path / "gone")], worker_process=True)
    process = ModelProcess(settings)
    with pytest.raises(UserError, match="gone"):
        process.wait_ready()
    process.close()


def test_stopped_model_process_answers_503(dict_dirs: dict[str, Path], state: Any) -> None:
    """A model process that died leaves reads working and text requests with a clear 503."""
    from sae.errors import UserError
    from server.app import create_app
    from server.model_process import ModelProcess

    process = ModelProcess(make_settings(dict_dirs, worker_process=True))
    process._proc.kill()
    process._proc.join()
    with pytest.raises(UserError, match=r"exited while loading"):
        process.wait_ready()
    dead = dataclasses.replace(state, model_process=process)
    try:
        with httpx.Client(timeout=60) as c, running_server(create_app(state=dead)) as url:
            r = c.post(url + "/api/activations", json={"text": "a", "features": ["mlp0/1"]})
            assert_error(r, 503, "unavailable")
            assert c.get(url + "/api/features/mlp0/1").status_code == 200
    finally:
        process.close()
