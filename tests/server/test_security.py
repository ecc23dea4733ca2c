"""The Host check (DNS rebinding) and the browser page's security headers, on a real server."""

from __future__ import annotations

import re
import socket
from typing import Any

import httpx

from server.security import host_name, trusted_hosts
from tests.server.conftest import serve_state
from tests.server.helpers import assert_error


def test_host_names() -> None:
    assert host_name("Example.ORG:8000") == "example.org"
    assert host_name("[::1]:8000") == "::1" and host_name("[::1]") == "::1"
    assert host_name("::1") == "::1" and host_name("localhost") == "localhost"
    assert host_name("a.b:x") == "a.b:x"  # not a port: the name as given, which is not trusted
    hosts = trusted_hosts("127.0.0.1", [])
    assert hosts == {"localhost", "127.0.0.1", "::1"}
    assert trusted_hosts("10.0.0.5", ["My.Box "]) == hosts | {"10.0.0.5", "my.box"}
    assert trusted_hosts("0.0.0.0", []) == hosts  # a wildcard is no name a browser sends


def raw_get(url: str, host: bytes, path: bytes = b"/api/dictionaries") -> tuple[int, bytes]:
    """A GET with exactly this Host header (httpx would fix it up)."""
    addr, port = url.removeprefix("http://").split(":")
    with socket.create_connection((addr, int(port)), timeout=10) as s:
        s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_untrusted_host_is_refused(client: httpx.Client, base_url: str) -> None:
    port = base_url.rsplit(":", 1)[1].encode()
    for host in (b"127.0.0.1:" + port, b"localhost:" + port, b"LOCALHOST", b"[::1]:" + port):
        assert raw_get(base_url, host)[0] == 200, host
    for host in (b"evil.example", b"evil.example:" + port, b"127.0.0.1.evil.example", b""):
        status, body = raw_get(base_url, host)
        assert status == 400, host
        r = httpx.Response(400, content=body)
        err = assert_error(r, 400, "untrusted_host")
        assert "--allowed-hosts" in err["message"]
    # The browser page and the API docs are refused alike.
    assert raw_get(base_url, b"evil.example", b"/")[0] == 400
    assert_error(client.get("/api/dictionaries", headers={"Host": "evil.example"}), 400)


def test_allowed_hosts_setting(state: Any) -> None:
    with serve_state(state, allowed_hosts=["feats.example"]) as url:
        assert raw_get(url, b"feats.example:80")[0] == 200
        assert raw_get(url, b"127.0.0.1")[0] == 200
        assert raw_get(url, b"other.example")[0] == 400
    with serve_state(state, allowed_hosts=["*"]) as url:
        assert raw_get(url, b"other.example")[0] == 200


def test_browser_page_headers(client: httpx.Client) -> None:
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'"  # no inline scripts, no eval
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert page.headers["x-content-type-options"] == "nosniff"
    # Nothing in the page needs an exception: every script is a file, no inline handlers.
    assert re.findall(r"<script(?![^>]*\bsrc=)", page.text) == []
    assert re.findall(r"\son[a-z]+\s*=", page.text) == []
