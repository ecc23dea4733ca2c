"""Access and limits on a real uvicorn server: text and body limits, malformed requests, the API
key for writes, private reads, the per-client rate limit and the queue's back-pressure."""

from __future__ import annotations

import socket
import threading
from typing import Any

import httpx

from tests.server.conftest import API_KEY, serve_state
from tests.server.helpers import assert_error


def test_text_limits_and_validation(client: httpx.Client, auth: dict[str, str]) -> None:
    long_text = "x = 1\n" * 40  # > 48 tokens
    err = assert_error(
        client.post("/api/activations", json={"text": long_text, "features": ["mlp0/1"]}),
        422,
        "limit_exceeded",
    )
    assert "limit is 48" in err["message"]
    assert_error(client.post("/api/activations", json={"text": "", "features": ["mlp0/1"]}), 422)
    assert_error(
        client.post(
            "/api/activations", json={"text": "a", "features": [f"mlp0/{i}" for i in range(9)]}
        ),
        422,
        "limit_exceeded",
    )
    steer = {
        "prompt": "def",
        "interventions": [{"feature": "mlp0/1", "strength": 1}],
        "max_new_tokens": 17,
    }
    assert_error(client.post("/api/steer", json=steer, headers=auth), 422, "limit_exceeded")
    steer["max_new_tokens"] = 2
    steer["interventions"] = [{"feature": "mlp0/1", "mode": "scale", "strength": 1}]
    assert_error(client.post("/api/steer", json=steer, headers=auth), 422, "validation_error")


def test_body_limits_and_malformed_requests(client: httpx.Client, base_url: str) -> None:
    big = {"text": "a" * 20000, "features": ["mlp0/1"]}
    assert_error(client.post("/api/activations", json=big), 413, "payload_too_large")

    def chunks():  # no Content-Length: the server must count the streamed bytes
        for _ in range(40):
            yield b" " * 1024

    r = client.post(
        "/api/activations", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_error(r, 413, "payload_too_large")
    assert_error(
        client.post(
            "/api/activations", content=b"{not json", headers={"Content-Type": "application/json"}
        ),
        422,
    )
    assert_error(
        client.post(
            "/api/activations",
            content=b"\xff\xfe\x00",
            headers={"Content-Type": "application/json"},
        ),
        400,
        "bad_request",
    )
    assert_error(client.post("/api/activations", json=[1, 2]), 422)
    assert_error(client.post("/api/activations", content=b"text=hi"), 422)
    assert_error(client.get("/api/nope"), 404, "not_found")
    assert_error(client.delete("/api/dictionaries"), 405, "method_not_allowed")
    assert_error(client.get("/api/activations"), 405)
    # A raw request with a lying Content-Length still gets an answer, not a hang or a 500.
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /api/activations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 999999\r\n\r\n{}"
        )
        head = s.recv(4096).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413")


def test_writes_disabled_without_a_key(state: Any) -> None:
    with serve_state(state, api_key=None) as url, httpx.Client(base_url=url) as c:
        err = assert_error(
            c.post("/api/features/mlp0/1/labels", json={"text": "x"}), 403, "forbidden"
        )
        assert "api key" in err["message"].lower()
        steer = {"prompt": "def", "interventions": [{"feature": "mlp0/1", "strength": 1}]}
        assert_error(c.post("/api/steer", json=steer, headers={"X-API-Key": API_KEY}), 403)
        assert c.get("/api/features/mlp0/1").status_code == 200


def test_private_reads(state: Any) -> None:
    with serve_state(state, public_reads=False) as url, httpx.Client(base_url=url) as c:
        assert_error(c.get("/api/dictionaries"), 401, "unauthorized")
        assert_error(c.post("/api/activations", json={"text": "a", "features": ["mlp0/1"]}), 401)
        assert c.get("/api/dictionaries", headers={"X-API-Key": API_KEY}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_rate_limit_answers_429(state: Any) -> None:
    body = {"text": "a", "features": ["mlp0/1"]}
    with serve_state(state, rate_limit=2) as url, httpx.Client(base_url=url) as c:
        assert c.post("/api/activations", json=body).status_code == 200
        assert (
            c.post("/api/top-features", json={"text": "a", "dictionary": "mlp0"}).status_code == 200
        )
        r = c.post("/api/activations", json=body)
        assert_error(r, 429, "too_many_requests")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert c.get("/api/features/mlp0/1").status_code == 200  # reads are not model work
        # Unauthenticated steering is refused before it can use up the quota.
        steer = {"prompt": "a", "interventions": [{"feature": "mlp0/1", "strength": 0}]}
        assert_error(c.post("/api/steer", json=steer), 401)


def test_queue_full_answers_503(state: Any) -> None:
    """Back-pressure: with max_queue=1 and the model busy, a second request is refused at once."""
    import dataclasses

    from server.app import create_app
    from server.worker import ModelQueue
    from tests.server.conftest import running_server

    queue = ModelQueue(1)
    busy_state = dataclasses.replace(state, queue=queue)
    body = {"text": "a", "features": ["mlp0/1"]}
    release = threading.Event()
    queue.submit(release.wait)  # the model worker is busy
    try:
        with (
            running_server(create_app(state=busy_state)) as url,
            httpx.Client(base_url=url, timeout=30) as c,
        ):
            first: dict[str, Any] = {}
            t = threading.Thread(
                target=lambda: first.setdefault("r", c.post("/api/activations", json=body))
            )
            t.start()
            for _ in range(500):
                if queue.pending:
                    break
                threading.Event().wait(0.01)
            r = c.post("/api/activations", json=body)
            assert_error(r, 503, "busy")
            assert r.headers["retry-after"] == "1"
            release.set()
            t.join(timeout=30)
            assert first["r"].status_code == 200
    finally:
        release.set()
        queue.close()


def _limited_request(target: str, n: int) -> tuple[str, str, Any]:
    """A valid request whose `target` (a body field or a query parameter) is `n`."""
    steer = {"prompt": "a", "interventions": [{"feature": "mlp0/1", "strength": 0}]}
    requests: dict[str, tuple[str, str, Any]] = {
        "SteerRequest.max_new_tokens": ("POST", "/api/steer", {**steer, "max_new_tokens": n}),
        "SteerRequest.interventions": (
            "POST",
            "/api/steer",
            {**steer, "interventions": steer["interventions"] * n, "max_new_tokens": 1},
        ),
        "BatchFeaturesRequest.features": (
            "POST",
            "/api/features/batch",
            {"features": ["mlp0/1"] * n, "examples_limit": 0},
        ),
        "BatchFeaturesRequest.examples_limit": (
            "POST",
            "/api/features/batch",
            {"features": ["mlp0/1"], "examples_limit": n},
        ),
        "ActivationsRequest.features": (
            "POST",
            "/api/activations",
            {"text": "a", "features": ["mlp0/1"] * n},
        ),
        "TopFeaturesRequest.limit": (
            "POST",
            "/api/top-features",
            {"text": "a", "dictionary": "mlp0", "limit": n},
        ),
        "GET /api/features/{dictionary}?limit": ("GET", f"/api/features/mlp0?limit={n}", None),
        "GET /api/features/{dictionary}/{feature_id}?limit": (
            "GET",
            f"/api/features/mlp0/1?limit={n}",
            None,
        ),
        "GET /api/search?limit": ("GET", f"/api/search?dictionary=mlp0&q=a&limit={n}", None),
    }
    return requests[target]


def test_the_schema_states_exactly_the_limits_enforced(
    client: httpx.Client, auth: dict[str, str], state: Any
) -> None:
    from server.limits import LIMITS, TOKEN_FIELDS

    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert schemas["SteerRequest"]["properties"]["max_new_tokens"]["maximum"] == 16
    for limit in LIMITS:
        bound = getattr(state.settings, limit.setting)
        for target in limit.bodies:
            schema, _, field = target.partition(".")
            prop = schemas[schema]["properties"][field]
            assert prop.get("maximum", prop.get("maxItems")) == bound, target
        for target in limit.queries:
            route, _, name = target.partition("?")
            method, path = route.split(" ", 1)
            (param,) = [
                p for p in spec["paths"][path][method.lower()]["parameters"] if p["name"] == name
            ]
            assert [o.get("maximum") for o in param["schema"]["anyOf"]] == [bound, None], target
        for target in (*limit.bodies, *limit.queries):
            # The bound itself is served; one more is refused, saying the limit.
            method, url, body = _limited_request(target, bound)
            r = client.request(method, url, json=body, headers=auth)
            assert r.status_code == 200, (target, r.text)
            method, url, body = _limited_request(target, bound + 1)
            err = assert_error(
                client.request(method, url, json=body, headers=auth), 422, "limit_exceeded"
            )
            assert f"the limit is {bound}" in err["message"], target
    for target in TOKEN_FIELDS:
        schema, _, field = target.partition(".")
        assert "At most 48 tokens" in schemas[schema]["properties"][field]["description"]
