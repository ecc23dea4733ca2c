"""Request limits from one place: each bound is a `ServerSettings` field, and `LIMITS` says
which request fields it bounds. Handlers enforce a bound with `check_body` / `page_size`, and
`document_limits` writes the same values into the OpenAPI schema (a number's `maximum`, a
list's `maxItems`), so /docs and schema-driven clients see exactly what the server enforces.
A test walks the table: at each bound a request passes, one over it gets 422."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from server.inference import LimitExceeded
from server.settings import ServerSettings


@dataclass(frozen=True)
class Limit:
    setting: str
    """The `ServerSettings` field that holds the bound."""
    bodies: tuple[str, ...] = ()
    """Request-body fields it bounds, as `Schema.field` (a number, or a list's length)."""
    queries: tuple[str, ...] = ()
    """Query parameters it bounds, as `METHOD /path?param`."""


LIMITS: tuple[Limit, ...] = (
    Limit("max_new_tokens", bodies=("SteerRequest.max_new_tokens",)),
    Limit(
        "max_batch",
        bodies=(
            "BatchFeaturesRequest.features",
            "ActivationsRequest.features",
            "SteerRequest.interventions",
        ),
    ),
    Limit(
        "max_page",
        bodies=("BatchFeaturesRequest.examples_limit", "TopFeaturesRequest.limit"),
        queries=(
            "GET /api/features/{dictionary}?limit",
            "GET /api/features/{dictionary}/{feature_id}?limit",
            "GET /api/search?limit",
        ),
    ),
)
TOKEN_FIELDS = ("ActivationsRequest.text", "TopFeaturesRequest.text", "SteerRequest.prompt")
"""Texts bounded by `max_prompt_tokens`: a count of tokens, which no JSON-schema keyword can
state, so the schema says it in the field's description."""


def check_body(settings: ServerSettings, req: BaseModel) -> None:
    """LimitExceeded (422) for the first field of `req` over its bound."""
    name = type(req).__name__
    for limit in LIMITS:
        bound = getattr(settings, limit.setting)
        for target in limit.bodies:
            schema, _, field = target.partition(".")
            if schema != name:
                continue
            value = getattr(req, field)
            size = len(value) if isinstance(value, list) else value
            if size > bound:
                raise LimitExceeded(f"{field} is {size}; the limit is {bound}")


def page_size(settings: ServerSettings, limit: int | None, default: int) -> int:
    """A `limit` query parameter: `default` (at most max_page) if not given; over max_page
    is an error."""
    if limit is None:
        return min(default, settings.max_page)
    if limit > settings.max_page:
        raise LimitExceeded(f"limit is {limit}; the limit is {settings.max_page}")
    return limit


def _bound(prop: dict[str, Any], bound: int) -> None:
    if prop.get("type") == "array":
        prop["maxItems"] = bound
    else:
        prop["maximum"] = bound


def document_limits(openapi: dict[str, Any], settings: ServerSettings) -> dict[str, Any]:
    """Write every bound of `LIMITS` (and the prompt-token limit) into an OpenAPI schema."""
    schemas = openapi["components"]["schemas"]
    for limit in LIMITS:
        bound = getattr(settings, limit.setting)
        for target in limit.bodies:
            schema, _, field = target.partition(".")
            _bound(schemas[schema]["properties"][field], bound)
        for target in limit.queries:
            route, _, param = target.partition("?")
            method, path = route.split(" ", 1)
            for p in openapi["paths"][path][method.lower()]["parameters"]:
                if p["name"] == param:
                    options = p["schema"].get("anyOf", [p["schema"]])
                    for option in options:
                        if option.get("type") == "integer":
                            _bound(option, bound)
    for target in TOKEN_FIELDS:
        schema, _, field = target.partition(".")
        prop = schemas[schema]["properties"][field]
        prop["description"] = (
            f"{prop.get('description', '')} At most {settings.max_prompt_tokens} tokens "
            "(and the model's context)."
        ).strip()
    return openapi
