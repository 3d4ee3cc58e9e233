"""Scripted misbehaviour: the kinds of fault, the `Fault` a test injects, one handler per kind.

`SimulatorState.take_fault` decides which armed fault fires on a request (latency adds up;
at most one other fault fires); `answer` then hands that fault to its kind's handler in
`HANDLERS`, which builds the response the request gets instead of the normal one.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from syncd.simulator import dataset, queries, wire

if TYPE_CHECKING:
    from syncd.simulator.state import SimulatorState


class FaultKind(enum.StrEnum):
    """What a `Fault` does to the request it fires on; `Fault` accepts the values as well."""

    THROTTLED = "429"
    """429 Too Many Requests, with `retry_after_s` in the body, a header or both."""
    SERVER_ERROR = "520"
    """A server error (sent as 520) of `error_type`, "transport" by default."""
    STATUS = "status"
    """An error with HTTP `status` (>= 500 sent as 520) of `error_type`, "logical" by default."""
    FORBIDDEN = "403"
    """403: insufficient rights."""
    UNAUTHORIZED = "401"
    """401, as if the token had been revoked."""
    ASYNC_ACTION = "async202"
    """202 and an async action that is done after `polls` polls."""
    LATENCY = "latency"
    """`delay_s` before answering, added to whatever else answers."""
    HANG = "hang"
    """No answer until the server stops (or `SimulatorState.hang_s` passes)."""
    MALFORMED_JSON = "malformed_json"
    """A 200 whose body is not JSON."""
    TRUNCATED = "truncated"
    """The first half of the page's body."""
    BAD_UUID = "bad_uuid"
    """One item's `jobUid` (a catalog item's `instanceUid`) is not a UUID."""
    MISSING_FIELD = "missing_field"
    """One item lacks `linkedJobUid` (a catalog item its `instanceUid`)."""
    WRONG_TOTAL = "wrong_total"
    """`total` is 7 too many."""
    WRONG_OFFSET = "wrong_offset"
    """The first page, whatever `offset` was asked for."""
    WRONG_COUNT = "wrong_count"
    """`count` is one more than the items sent."""
    DRIFT = "drift"
    """The right page, then the collection changes: one item removed, one added."""
    NULL_META = "null_meta"
    """`meta` is null."""
    HUGE_TOTAL = "huge_total"
    """The page claims `total` items (a hostile server)."""
    SHORT_PAGE = "short_page"
    """One item, whatever the limit."""
    OVERSIZED_BODY = "oversized_body"
    """A valid page padded to `size_bytes`."""
    GZIP_BOMB = "gzip_bomb"
    """A gzip body that inflates to `size_bytes`."""
    ECHO_SECRET = "echo_secret"  # noqa: S105 - a fault's name, not a secret
    """An error (HTTP `status`, 400 by default, in `shape`) quoting the request's
    Authorization header; at the token endpoint, an OAuth error quoting the form sent,
    password included."""
    MESSAGE = "message"
    """An error whose text is `message`, in `shape`, with HTTP `status` (400 by default)."""


FAULT_KINDS = frozenset(FaultKind)
# The token endpoint has no pages, so only these make sense there (and only with offset None).
TOKEN_FAULT_KINDS = frozenset(
    {
        FaultKind.THROTTLED,
        FaultKind.SERVER_ERROR,
        FaultKind.LATENCY,
        FaultKind.HANG,
        FaultKind.ECHO_SECRET,
        FaultKind.MESSAGE,
    }
)


@dataclass
class Fault:
    """A scripted misbehaviour, matched per request by tenant, collection, offset, times and
    probability.

    `kind` is a `FaultKind` or its value (`Fault("429")`); the other fields tune particular
    kinds, as `FaultKind` says. `collection` (a name of `dataset.COLLECTIONS`) targets one
    collection; None, any of them. The token endpoint honours `TOKEN_FAULT_KINDS` when
    `offset` and `collection` are None. `shape` is one of `wire.ERROR_SHAPES`.
    """

    kind: FaultKind
    tenant: str | None = None
    offset: int | None = None
    collection: str | None = None
    times: int | None = 1
    probability: float = 1.0
    retry_after_s: float | None = None
    retry_after_in: str = "body"
    delay_s: float = 0.0
    status: int | None = None
    error_type: str | None = None
    polls: int = 2
    total: int = 10**12
    size_bytes: int = 64 * 1024**2
    message: str = ""
    shape: str = "errors"

    def __post_init__(self) -> None:
        try:
            self.kind = FaultKind(self.kind)
        except ValueError:
            known = sorted(kind.value for kind in FaultKind)
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {known}") from None
        if self.retry_after_in not in ("body", "header", "both"):
            raise ValueError("retry_after_in must be 'body', 'header' or 'both'")
        if self.kind == FaultKind.STATUS and self.status is None:
            raise ValueError("a 'status' fault needs status=")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be within 0..1")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1, or None for forever")
        if self.shape not in wire.ERROR_SHAPES:
            raise ValueError(f"shape must be one of {wire.ERROR_SHAPES}")
        if self.collection is not None and self.collection not in wire.COLLECTION_PATHS:
            raise ValueError(
                f"unknown collection {self.collection!r}; one of {sorted(wire.COLLECTION_PATHS)}"
            )


@dataclass(frozen=True)
class Context:
    """The request a fault answers, and what its handler may use to answer it."""

    state: SimulatorState
    tenant: str | None
    headers: Mapping[str, str]
    sleep: Callable[[float], Awaitable[None]]
    """Sleeps, but returns early when the server shuts down."""
    query: queries.PageQuery | None = None
    """A collection request's query; None at the token endpoint."""
    form: Mapping[str, str] | None = None
    """The token endpoint's form fields; None for a collection request."""
    collection: str = "backup_copy_job_objects"
    """The collection asked for (meaningless at the token endpoint)."""

    def page(self) -> tuple[str, queries.PageQuery]:
        """(tenant, query) of the collection request being answered."""
        # Page faults are not in TOKEN_FAULT_KINDS, so they never fire at the token endpoint.
        assert self.tenant is not None and self.query is not None, "not a collection request"
        return self.tenant, self.query

    def page_body(self) -> bytes:
        """The body the request would get without a fault."""
        tenant, query = self.page()
        return self.state.page_body(tenant, query, self.collection)

    def identity_fields(self) -> tuple[str, str]:
        """(a field to corrupt, a required field to drop) of the collection's items."""
        if self.collection in dataset.LINK_COLLECTIONS:
            return "jobUid", "linkedJobUid"
        return "instanceUid", "instanceUid"


Handler = Callable[[Fault, Context], Awaitable[web.Response]]
"""Answers a request in place of the simulator, as one kind of fault does."""


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _padded_page(body: bytes, size_bytes: int) -> bytes:
    """A valid page body grown to `size_bytes` with JSON whitespace."""
    return body + b" " * max(0, size_bytes - len(body))


@functools.lru_cache(maxsize=4)
def _gzip_bomb(body: bytes, size_bytes: int) -> bytes:
    """`body` padded to `size_bytes` and gzipped: kilobytes on the wire, megabytes inflated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [compressor.compress(body)]
    chunk = b" " * (1024 * 1024)
    remaining = max(0, size_bytes - len(body))
    while remaining > 0:
        parts.append(compressor.compress(chunk[: min(remaining, len(chunk))]))
        remaining -= len(chunk)
    parts.append(compressor.flush())
    return b"".join(parts)


async def _throttled(fault: Fault, context: Context) -> web.Response:
    extra: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if fault.retry_after_s is not None:
        if fault.retry_after_in in ("body", "both"):
            extra["retryAfter"] = _number(fault.retry_after_s)
        if fault.retry_after_in in ("header", "both"):
            headers["Retry-After"] = str(_number(fault.retry_after_s))
    body = wire.error_body(429, "Too many requests", "transport", **extra)
    return wire.json_response(429, body, headers)


async def _server_error(fault: Fault, context: Context) -> web.Response:
    return wire.vspc_error(500, "Internal server error", fault.error_type or "transport")


async def _status(fault: Fault, context: Context) -> web.Response:
    assert fault.status is not None
    message = f"Simulated error {fault.status}"
    return wire.vspc_error(fault.status, message, fault.error_type or "logical")


async def _forbidden(fault: Fault, context: Context) -> web.Response:
    return wire.vspc_error(403, "Access denied: insufficient rights", "security")


async def _unauthorized(fault: Fault, context: Context) -> web.Response:
    return wire.vspc_error(401, "Authentication failed: token was revoked", "security")


async def _queue_async_action(fault: Fault, context: Context) -> web.Response:
    tenant, _ = context.page()
    action_id = context.state.new_async_action(tenant, context.page_body(), fault.polls)
    return wire.async_running(action_id)


async def _hang(fault: Fault, context: Context) -> web.Response:
    await context.sleep(context.state.hang_s)
    return wire.vspc_error(500, "The server is shutting down", "transport")


async def _malformed_json(fault: Fault, context: Context) -> web.Response:
    return wire.json_response(200, b'{"meta": {"pagingInfo": {"total": 3,, "data": [')


async def _truncated(fault: Fault, context: Context) -> web.Response:
    body = context.page_body()
    # web.Response sets Content-Length from the cut body: a JSON error, not EOF.
    return wire.json_response(200, body[: len(body) // 2])


async def _wrong_offset(fault: Fault, context: Context) -> web.Response:
    tenant, query = context.page()
    first_page = dataclasses.replace(query, offset=0)
    return wire.json_response(200, context.state.page_body(tenant, first_page, context.collection))


async def _drift(fault: Fault, context: Context) -> web.Response:
    tenant, _ = context.page()
    body = context.page_body()
    context.state.drift(tenant, context.collection)
    return wire.json_response(200, body)


async def _oversized_body(fault: Fault, context: Context) -> web.Response:
    return wire.json_response(200, _padded_page(context.page_body(), fault.size_bytes))


async def _gzip_bomb_body(fault: Fault, context: Context) -> web.Response:
    bomb = _gzip_bomb(context.page_body(), fault.size_bytes)
    return wire.json_response(200, bomb, {"Content-Encoding": "gzip"})


async def _echo_secret(fault: Fault, context: Context) -> web.Response:
    if context.form is not None:
        sent = ", ".join(f"{key}={value}" for key, value in context.form.items())
        return wire.oauth_error("invalid_request", f"Cannot parse the request: {sent}")
    header = context.headers.get("Authorization", "")
    message = f"Malformed request header: Authorization: {header}"
    return wire.error_in_shape(fault.status or 400, message, fault.shape)


async def _message(fault: Fault, context: Context) -> web.Response:
    return wire.error_in_shape(fault.status or 400, fault.message, fault.shape)


Damage = Callable[[Fault, Context, dict[str, Any]], None]


def _damaged_page(damage: Damage) -> Handler:
    """A handler answering 200 with the request's page document as `damage` leaves it.

    `damage` may change the document and its lists, but must replace items, not edit them:
    they are the cached ones.
    """

    async def handler(fault: Fault, context: Context) -> web.Response:
        tenant, query = context.page()
        document = context.state.page_document(tenant, query, context.collection)
        damage(fault, context, document)
        return wire.json_response(200, orjson.dumps(document))

    return handler


def _bad_uuid(fault: Fault, context: Context, document: dict[str, Any]) -> None:
    data: list[dict[str, Any]] = document["data"]
    field, _ = context.identity_fields()
    if data:
        data[len(data) // 2] = {**data[len(data) // 2], field: "not-a-uuid"}


def _missing_field(fault: Fault, context: Context, document: dict[str, Any]) -> None:
    data: list[dict[str, Any]] = document["data"]
    _, field = context.identity_fields()
    if data:
        item = dict(data[len(data) // 2])
        item.pop(field, None)
        data[len(data) // 2] = item


def _wrong_total(fault: Fault, context: Context, document: dict[str, Any]) -> None:
    document["meta"]["pagingInfo"]["total"] += 7


def _wrong_count(fault: Fault, context: Context, document: dict[str, Any]) -> None:
    document["meta"]["pagingInfo"]["count"] = len(document["data"]) + 1


def _null_meta(fault: Fault, context: Context, document: dict[str, Any]) -> None:
    document["meta"] = None


def _huge_total(fault: Fault, context: Context, document: dict[str, Any]) -> None:
    document["meta"]["pagingInfo"]["total"] = fault.total


def _short_page(fault: Fault, context: Context, document: dict[str, Any]) -> None:
    document["data"] = document["data"][:1]
    document["meta"]["pagingInfo"]["count"] = len(document["data"])


# LATENCY has none: `take_fault` turns it into a delay before whatever answers.
HANDLERS: Mapping[FaultKind, Handler] = {
    FaultKind.THROTTLED: _throttled,
    FaultKind.SERVER_ERROR: _server_error,
    FaultKind.STATUS: _status,
    FaultKind.FORBIDDEN: _forbidden,
    FaultKind.UNAUTHORIZED: _unauthorized,
    FaultKind.ASYNC_ACTION: _queue_async_action,
    FaultKind.HANG: _hang,
    FaultKind.MALFORMED_JSON: _malformed_json,
    FaultKind.TRUNCATED: _truncated,
    FaultKind.BAD_UUID: _damaged_page(_bad_uuid),
    FaultKind.MISSING_FIELD: _damaged_page(_missing_field),
    FaultKind.WRONG_TOTAL: _damaged_page(_wrong_total),
    FaultKind.WRONG_OFFSET: _wrong_offset,
    FaultKind.WRONG_COUNT: _damaged_page(_wrong_count),
    FaultKind.DRIFT: _drift,
    FaultKind.NULL_META: _damaged_page(_null_meta),
    FaultKind.HUGE_TOTAL: _damaged_page(_huge_total),
    FaultKind.SHORT_PAGE: _damaged_page(_short_page),
    FaultKind.OVERSIZED_BODY: _oversized_body,
    FaultKind.GZIP_BOMB: _gzip_bomb_body,
    FaultKind.ECHO_SECRET: _echo_secret,
    FaultKind.MESSAGE: _message,
}


async def answer(fault: Fault, context: Context) -> web.Response:
    """The response `fault` gives the request in `context`, in place of the normal one."""
    return await HANDLERS[fault.kind](fault, context)
