"""Service settings: one typed dataclass, filled from flags (`sae serve`) or `SAE_SERVE_*`
environment variables, validated once at start-up so a bad value stops the server before it
listens instead of surfacing as a 500 on the first request.

A variable is parsed by the same `field_parser` as its flag (sae/dataclass_cli.py), so both
accept the same text. Why not pydantic-settings, FastAPI's usual choice: tried here
(pydantic-settings 2.16), it made this module no smaller and looser. Its environment source
reads only `os.environ`, so `settings_from_env(environ)` needs a subclass overriding a
private loader; the messages users see ("max_queue must be a positive integer") still need
our own validator; it accepts SAE_SERVE_PUBLIC_READS=t, SAE_SERVE_MAX_BATCH=8.0 and
`max_queue=True` (as 1), which are errors here; and the `sae serve` flags would need the
dataclass CLI to learn pydantic fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from sae.dataclass_cli import field_parser
from sae.errors import UserError

ENV_PREFIX = "SAE_SERVE_"
LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass
class ServerSettings:
    """Everything `sae serve` can be told. Each field is also read from `SAE_SERVE_<FIELD>`."""

    dictionaries: list[str] = field(default_factory=list)
    """Dictionary directories to serve, each `PATH` or `NAME=PATH` (the name is the first part
    of a feature address `NAME/FEATURE_ID`; default: the directory's name, MEMBER for a
    sweep member's folder `name=MEMBER`, RUN for a run's `RUN/dictionary`). An existing path
    is always read as a path."""
    host: str = "127.0.0.1"
    """Interface to listen on. Loopback by default: expose deliberately."""
    port: int = 8000
    """TCP port."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Host names the server answers (the Host header) besides the bound address and
    localhost, 127.0.0.1, ::1; others get 400, which stops DNS rebinding. Add the names users
    type when serving on a network (--host 0.0.0.0); `*` answers any name."""
    model: str | None = None
    """Language model for text requests; default: each dictionary's cfg.model_name."""
    device: str = "cpu"
    """Torch device for the model and dictionaries (cpu, cuda, cuda:1, mps)."""
    api_key: str | None = None
    """Key required (as `Authorization: Bearer KEY` or `X-API-Key: KEY`) for writes (labels)
    and steering. Unset: writes and steering are refused with 403."""
    generate_api_key: bool = True
    """`sae serve` with no api_key makes a random one at start-up and prints it, with a
    browser URL that carries it (like Jupyter's token). False: writes and steering stay off."""
    public_reads: bool = True
    """Serve reads without a key. False: every /api request needs the key."""
    prepend_bos: bool = True
    """Prepend the model's BOS token to posted text (as the analysis pass does)."""
    max_prompt_tokens: int = 256
    """Longest posted text or prompt, in tokens (also capped by the model's context)."""
    max_new_tokens: int = 64
    """Largest `max_new_tokens` a steering request may ask for."""
    max_batch: int = 64
    """Most feature addresses in one batch-get or activations request."""
    max_page: int = 100
    """Largest page (`limit`) for listings, searches and top examples."""
    max_body_bytes: int = 65536
    """Largest request body; bigger bodies get 413 before they are read."""
    rate_limit: int = 0
    """Model requests (text activations, top features, steering) allowed per client address
    per minute; more get 429 with Retry-After. 0: no limit."""
    max_queue: int = 64
    """Most model requests waiting or running at once; more get 503 with Retry-After
    (back-pressure). Concurrent activation requests share one forward pass, so this many can
    be served together; beyond it the queue sheds."""
    worker_process: bool = True
    """Run the model (text activations, top features, steering) in its own process at a lower
    CPU priority, so feature reads never wait behind it; false: on a thread of the server
    process (less memory: one copy of the model)."""
    log_level: LogLevel = "info"
    """Server log level."""

    def __post_init__(self) -> None:
        for name in (
            "max_prompt_tokens",
            "max_new_tokens",
            "max_batch",
            "max_page",
            "max_body_bytes",
            "max_queue",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"setting {name} must be a positive integer, got {value!r}")
        if not isinstance(self.rate_limit, int) or self.rate_limit < 0:
            raise UserError(f"setting rate_limit must be >= 0, got {self.rate_limit!r}")
        if not 0 <= self.port <= 65535:
            raise UserError(f"setting port must be in 0..65535, got {self.port}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise UserError("setting api_key must be at least 8 characters")
        if not self.public_reads and self.api_key is None:
            raise UserError("public_reads is off but no api_key is set: nobody could read")
        if self.log_level not in typing.get_args(LogLevel):
            raise UserError(f"setting log_level must be one of {typing.get_args(LogLevel)}")
        names = [spec_name(s) for s in self.dictionaries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError(
                f"two dictionaries are named {', '.join(dupes)}; name them with NAME=PATH"
            )
        for n in names:
            if not n or "/" in n or n.startswith("."):
                raise UserError(f"dictionary name {n!r} must be non-empty and contain no '/'")


SWEEP_MEMBER_PREFIX = "name="
"""`sae train --sweep` saves each member in a folder `name=MEMBER`."""
RUN_DICTIONARY = "dictionary"
"""`sae train` without a sweep saves its dictionary in RUN/dictionary."""


def _is_path(spec: str) -> bool:
    """An existing path is a path, even if it contains `=` (sweep member folders do)."""
    return "=" not in spec or os.path.exists(os.path.expanduser(spec))


def spec_name(spec: str) -> str:
    """The served name of a `PATH` or `NAME=PATH` dictionary spec: NAME, else the folder's
    name, MEMBER for a sweep member's folder `name=MEMBER`, or RUN for a run's `RUN/dictionary`."""
    if not _is_path(spec):
        return spec.split("=", 1)[0]
    path = os.path.normpath(spec)
    base = os.path.basename(path)
    if base == RUN_DICTIONARY and os.path.basename(os.path.dirname(path)):
        return os.path.basename(os.path.dirname(path))
    return base.removeprefix(SWEEP_MEMBER_PREFIX) if base != SWEEP_MEMBER_PREFIX else base


def spec_path(spec: str) -> str:
    return spec if _is_path(spec) else spec.split("=", 1)[1]


def settings_from_env(
    environ: typing.Mapping[str, str] | None = None, **given: Any
) -> ServerSettings:
    """Settings from `SAE_SERVE_*` variables, overridden by keyword arguments (flags)."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(ServerSettings)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServerSettings):
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is None:
            continue
        # The flag's parser, so a variable and its flag accept the same text; a list is
        # comma-separated.
        parse, extra = field_parser(hints[f.name])
        try:
            values[f.name] = (
                [parse(s) for s in raw.split(",") if s] if "nargs" in extra else parse(raw)
            )
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise UserError(f"{ENV_PREFIX}{f.name.upper()}={raw!r}: {e}") from None
    values.update({k: v for k, v in given.items() if v is not None})
    return ServerSettings(**values)
