"""What keeps a browser from turning the server against its user: the Host check and the
browser page's Content-Security-Policy.

Host check: a page on any web site can make the browser resolve its own name to 127.0.0.1
(DNS rebinding) and then read this server as "same origin". The browser still sends that
site's name in the Host header, so answering only trusted names closes the hole (the defence
Jupyter and Django use). Trusted by default: the bound address and the loopback names.

Content-Security-Policy: the page runs only its own script file (no inline or injected
scripts, no eval), talks only to this server, and cannot be framed; model text is already
inserted as text, so this is the second line.
"""

from __future__ import annotations

import ipaddress
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_response

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
"""For the browser page: its one script and stylesheet, API calls to this server only."""
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def trusted_hosts(bound: str, extra: list[str]) -> frozenset[str]:
    """Host names (without port, lower case) the server answers: the bound address unless it
    is a wildcard, the loopback names, and `extra` (`*` trusts every name)."""
    names = {*LOOPBACK_NAMES, *(h.strip().lower() for h in extra if h.strip())}
    if bound not in WILDCARD_ADDRESSES:
        names.add(bound.lower())
    return frozenset(names)


def host_name(header: str) -> str:
    """`example.org:8000` -> `example.org`; `[::1]:8000` -> `::1`; lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    name, sep, port = header.rpartition(":")
    if sep and port.isdigit() and port.isascii():
        try:  # a bare IPv6 address has colons of its own
            ipaddress.IPv6Address(header)
            return header
        except ValueError:
            return name
    return header


class HostCheck:
    """400 with the common error body for a request whose Host is not trusted."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str]) -> None:
        self.app = app
        self.hosts = hosts
        self.any = "*" in hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.any:
            await self.app(scope, receive, send)
            return
        raw = dict(scope.get("headers") or []).get(b"host", b"")
        host = host_name(raw.decode("latin-1"))
        if host in self.hosts:
            await self.app(scope, receive, send)
            return
        log.warning("refused a request for Host %r", host)
        refuse = error_response(
            400,
            "untrusted_host",
            f"host {host!r} is not served here; start the server with --allowed-hosts {host} "
            "to serve it",
            {"allowed_hosts": sorted(self.hosts)},
        )
        await refuse(scope, receive, send)
