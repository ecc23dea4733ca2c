"""Assertions shared by the server tests."""

from __future__ import annotations

from typing import Any

import httpx


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The one error body shape, whatever produced the error."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "detail"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]
