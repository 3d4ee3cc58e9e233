"""A VSPC REST API v3 simulator: the backup copy job `jobObjects` collection and its auth.

It is a real `aiohttp.web` application, used by the tests (over real sockets), by
`syncd simulate` for demos, and by the benchmarks. It follows the reference notes in
`vspc-api-notes.md`: bearer auth with API keys or password-grant tokens (refresh tokens
rotate), the `X-Client-Version` check, `limit`/`offset`/`sort`/`filter`/`select` as VSPC reads
them, every server error as HTTP 520, 429 throttling with `retryAfter`, and 202 async actions.
A 202's `Location` is a path relative to the server root (`/api/v3/asyncActions/<uuid>`);
polling it answers 202 until the action is done, then 200 with the page that the original
request would have got at the time it was made.

Without `sort` the order is deliberately unstable (a fresh random order per request), as the
API only promises "the default order based on its own semantics": a client that forgets to
sort gets duplicates and misses, and the tests notice.

Misbehaviour is scripted with `Fault`s injected into `SimulatorState`. Sorted page bodies are
cached per tenant and dropped on any change to that tenant's data, so a million pairs page
quickly; call `SimulatorState.invalidate` after editing `SimTenant.items` by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import enum
import functools
import logging
import math
import random
import secrets
import ssl
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

API_PREFIX = "/api/v3"
TOKEN_PATH = "/api/v3/token"  # noqa: S105 - a path, not a password
JOB_OBJECTS_PATH = "/api/v3/infrastructure/backupServers/jobs/backupCopyJobs/jobObjects"
ASYNC_ACTIONS_PATH = "/api/v3/asyncActions"
DEFAULT_LIMIT = 100
MAX_OFFSET = 2_147_483_647
PROPERTIES = ("jobUid", "linkedJobUid", "uniqueJobUid")
REQUEST_LOG_SIZE = 10_000

ERROR_SHAPES = ("errors", "error", "oauth")

_JSON_CONTENT_TYPE = "application/json; charset=utf-8"
_PAGE_CACHE_ENTRIES = 50_000
_ASYNC_ACTIONS_KEPT = 10_000
_ISSUED_TOKENS_KEPT = 10_000
_DUPLICATE_JOB_FRACTION = 0.005
_SHARED_SOURCE_FRACTION = 0.1

_log = logging.getLogger(__name__)


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
    """One item's `jobUid` is not a UUID."""
    MISSING_FIELD = "missing_field"
    """One item lacks `linkedJobUid`."""
    WRONG_TOTAL = "wrong_total"
    """`total` is 7 too many."""
    WRONG_OFFSET = "wrong_offset"
    """The first page, whatever `offset` was asked for."""
    WRONG_COUNT = "wrong_count"
    """`count` is one more than the items sent."""
    DRIFT = "drift"
    """The right page, then the data changes: one pair removed, one added."""
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
    """An error quoting the request's Authorization header (the token endpoint: its form,
    password included)."""
    MESSAGE = "message"
    """An error whose text is `message`, in the error `shape`, with HTTP `status` (400)."""


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
class SimTenant:
    """One VSPC account (or server) and its dataset; all tenants share one simulator."""

    name: str
    api_key: str = field(repr=False)
    username: str
    password: str = field(repr=False)
    items: list[dict[str, str]] = field(repr=False)
    mfa: bool = False
    read_only_key: bool = False


@dataclass
class Fault:
    """A scripted misbehaviour, matched per request by tenant, offset, times and probability.

    `kind` is a `FaultKind` or its value (`Fault("429")`); the other fields tune particular
    kinds, as `FaultKind` says. The token endpoint honours `TOKEN_FAULT_KINDS` when `offset`
    is None. `shape` is one of `ERROR_SHAPES`.
    """

    kind: FaultKind
    tenant: str | None = None
    offset: int | None = None
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
        if self.shape not in ERROR_SHAPES:
            raise ValueError(f"shape must be one of {ERROR_SHAPES}")


@dataclass
class RequestRecord:
    """One request as the simulator saw it. `status` stays 0 until it is answered (or forever,
    when the client gave up first). The Authorization value is redacted; `credential` says
    which kind authenticated the request: "api_key", "access_token" or None."""

    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    tenant: str | None = None
    status: int = 0
    credential: str | None = None
    started_at: float = 0.0
    duration_s: float = 0.0


@dataclass
class _ArmedFault:
    fault: Fault
    remaining: int | None


@dataclass
class _Token:
    tenant: str
    expires_at: float


@dataclass(frozen=True)
class TokenPair:
    """What a successful grant hands out."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in_s: int


@dataclass
class AsyncAction:
    """A queued request's answer, ready once `polls_left` more polls have been answered."""

    tenant: str
    body: bytes = field(repr=False)
    polls_left: int

    def poll(self) -> bytes | None:
        """The answer, or None (and one poll fewer to go) while it is still running."""
        if self.polls_left > 0:
            self.polls_left -= 1
            return None
        return self.body


@dataclass(frozen=True)
class PageQuery:
    """A jobObjects request's paging, sorting, filtering and selection, as parsed."""

    offset: int
    limit: int
    sort: tuple[tuple[str, bool], ...]  # (property, descending)
    filter_key: bytes
    predicate: Callable[[dict[str, str]], bool] | None
    select: tuple[str, ...]


class BadQuery(ValueError):
    """A query parameter VSPC would refuse with 400."""


def _uuid4(rng: random.Random) -> str:
    """A random version-4 UUID drawn from `rng` (reproducible, unlike `uuid.uuid4`)."""
    value = rng.getrandbits(128)
    value = (value & ~(0xF000 << 64)) | (0x4000 << 64)
    value = (value & ~(0xC000 << 48)) | (0x8000 << 48)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _copy_job_items(
    rng: random.Random, sources: list[str], unique_uid_fraction: float, links: int
) -> list[dict[str, str]]:
    """Pairs of one new backup copy job linked to `links` source jobs."""
    job_uid = _uuid4(rng)
    linked: list[str] = []
    while len(linked) < links:
        if sources and rng.random() < _SHARED_SOURCE_FRACTION:
            # One source job can feed several copy jobs.
            candidate = rng.choice(sources)
            if candidate in linked:
                continue
        else:
            candidate = _uuid4(rng)
            sources.append(candidate)
        linked.append(candidate)
    uniques: list[str | None]
    if rng.random() < _DUPLICATE_JOB_FRACTION:
        # Seen in the field: one VBR job known to VSPC twice (e.g. a re-added server).
        uniques = [_uuid4(rng), _uuid4(rng)]
    elif rng.random() < unique_uid_fraction:
        uniques = [_uuid4(rng)]
    else:
        uniques = [None]
    items = []
    for unique in uniques:
        for source in linked:
            item = {"jobUid": job_uid, "linkedJobUid": source}
            if unique is not None:
                item["uniqueJobUid"] = unique
            items.append(item)
    return items


def make_dataset(
    *, tenants: int, pairs_per_tenant: int, seed: int = 0, unique_uid_fraction: float = 0.9
) -> list[SimTenant]:
    """Deterministic tenants "tenant-1".. each with exactly `pairs_per_tenant` distinct pairs.

    Backup copy jobs link 1-5 source jobs (sometimes shared between copy jobs);
    `uniqueJobUid` is present on about `unique_uid_fraction` of copy jobs. About 0.5% of copy
    jobs appear twice, with the same `jobUid` and different `uniqueJobUid`s.
    """
    result = []
    for number in range(1, tenants + 1):
        name = f"tenant-{number}"
        rng = random.Random(f"syncd-simulator:{seed}:{name}")  # noqa: S311 - test data
        sources: list[str] = []
        items: list[dict[str, str]] = []
        while len(items) < pairs_per_tenant:
            items.extend(_copy_job_items(rng, sources, unique_uid_fraction, rng.randint(1, 5)))
        del items[pairs_per_tenant:]
        result.append(
            SimTenant(
                name=name,
                api_key=f"sim-key-{name}-{rng.getrandbits(96):024x}",
                username=f"{name}-user",
                password=f"{rng.getrandbits(64):016x}",
                items=items,
            )
        )
    return result


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _error_body(status: int, message: str, error_type: str, **extra: Any) -> bytes:
    error: dict[str, Any] = {"message": message, "type": error_type, "code": status}
    error.update(extra)
    return orjson.dumps({"errors": [error]})


def _json_response(
    status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> web.Response:
    response = web.Response(status=status, body=body, headers=headers)
    response.headers["Content-Type"] = _JSON_CONTENT_TYPE
    return response


def _vspc_error(
    status: int, message: str, error_type: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The VSPC error envelope; server errors are always sent as 520."""
    http_status = 520 if status >= 500 else status
    return _json_response(http_status, _error_body(status, message, error_type), headers)


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


def _error_in_shape(status: int, message: str, shape: str) -> web.Response:
    """An error answer carrying `message` in one of VSPC's error shapes."""
    if shape == "oauth":
        return _oauth_error("invalid_request", message)
    if shape == "error":
        return _json_response(
            status, orjson.dumps({"error": {"code": "BadRequest", "message": message}})
        )
    return _json_response(status, _error_body(status, message, "logical"))


def _async_running(action_id: str) -> web.Response:
    """202: the answer is being computed; poll `Location` for it."""
    body = orjson.dumps({"data": {"id": action_id, "status": "running"}})
    return _json_response(202, body, {"Location": f"{ASYNC_ACTIONS_PATH}/{action_id}"})


def _token_response(tokens: TokenPair) -> web.Response:
    body = {
        "access_token": tokens.access_token,
        "token_type": "bearer",
        "refresh_token": tokens.refresh_token,
        "expires_in": tokens.expires_in_s,
    }
    return _json_response(200, orjson.dumps(body))


def _oauth_error(error: str, description: str) -> web.Response:
    return _json_response(
        400, orjson.dumps({"error": error, "error_description": description, "error_uri": None})
    )


def _int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise BadQuery(f"'{name}' must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadQuery(f"'{name}' must be within {low}..{high}, got {value}")
    return value


def _json_param(query: Mapping[str, str], name: str) -> list[Any]:
    raw = query.get(name)
    if raw is None or not raw.strip():
        return []
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadQuery(f"'{name}' is not valid JSON") from None
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise BadQuery(f"'{name}' must be a JSON array of objects")
    return value


def _property(entry: Mapping[str, Any], key: str, what: str) -> str:
    name = entry.get(key)
    if name not in PROPERTIES:
        raise BadQuery(f"{what}: unknown property {name!r}")
    assert isinstance(name, str)
    return name


def _predicate(expression: Mapping[str, Any]) -> Callable[[dict[str, str]], bool]:
    operation = expression.get("operation")
    if operation in ("and", "or", "not"):
        inner_raw = expression.get("items")
        if not isinstance(inner_raw, list) or not inner_raw:
            raise BadQuery(f"filter: '{operation}' needs items")
        inner = [_predicate(item) for item in inner_raw if isinstance(item, dict)]
        if operation == "and":
            return lambda item: all(check(item) for check in inner)
        if operation == "or":
            return lambda item: any(check(item) for check in inner)
        return lambda item: not inner[0](item)
    name = _property(expression, "property", "filter")
    value = expression.get("value")
    if operation == "equals":
        return lambda item: item.get(name) == value
    if operation == "notEquals":
        return lambda item: item.get(name) != value
    if operation == "in" and isinstance(value, list):
        values = frozenset(value)
        return lambda item: item.get(name) in values
    raise BadQuery(f"filter: operation {operation!r} is not supported by the simulator")


def _sort_key(name: str) -> Callable[[dict[str, str]], str]:
    def key(item: dict[str, str]) -> str:
        return item.get(name, "")

    return key


def parse_query(query: Mapping[str, str], max_page_size: int) -> PageQuery:
    """The query parameters of a jobObjects request; `BadQuery` if VSPC would refuse them."""
    limit = _int_param(query, "limit", DEFAULT_LIMIT, 1, max_page_size)
    offset = _int_param(query, "offset", 0, 0, MAX_OFFSET)
    sort = []
    for entry in _json_param(query, "sort"):
        name = _property(entry, "property", "sort")
        direction = entry.get("direction", "ascending")
        if direction not in ("ascending", "descending"):
            raise BadQuery(f"sort: unknown direction {direction!r}")
        sort.append((name, direction == "descending"))
    filters = _json_param(query, "filter")
    predicate = _predicate({"operation": "and", "items": filters}) if filters else None
    select = tuple(
        _property(entry, "propertyPath", "select") for entry in _json_param(query, "select")
    )
    return PageQuery(
        offset=offset,
        limit=limit,
        sort=tuple(sort),
        filter_key=orjson.dumps(filters, option=orjson.OPT_SORT_KEYS),
        predicate=predicate,
        select=select,
    )


class SimulatorState:
    """The simulated VSPC's data, issued tokens, injected faults and observations.

    Observations for tests: `requests_by_status`, `max_in_flight` / `in_flight` (jobObjects
    requests per tenant), `request_log` (the last 10,000 requests), `token_grants` (successful
    grants by type), `issued_tokens` (the last 10,000 access and refresh tokens handed out)
    and `faults_fired` (by kind).

    The request handler (`create_app`) reads and changes the state only through its public
    methods: `authenticate`, the token methods, `take_fault`, `page_body` / `page_document`,
    `serving_page` and the async action methods.
    """

    def __init__(
        self,
        tenants: list[SimTenant],
        *,
        seed: int = 0,
        token_lifetime_s: float = 3600.0,
        require_client_version: bool = True,
        supported_versions: tuple[str, ...] = ("3.6", "3.5"),
        max_page_size: int = 500,
    ) -> None:
        self.tenants: dict[str, SimTenant] = {}
        self._by_api_key: dict[str, str] = {}
        self._by_username: dict[str, str] = {}
        for tenant in tenants:
            if tenant.name in self.tenants:
                raise ValueError(f"duplicate tenant name {tenant.name!r}")
            if tenant.api_key in self._by_api_key or tenant.username in self._by_username:
                raise ValueError(f"tenant {tenant.name!r} reuses another tenant's credentials")
            self.tenants[tenant.name] = tenant
            self._by_api_key[tenant.api_key] = tenant.name
            self._by_username[tenant.username] = tenant.name
        self.token_lifetime_s = token_lifetime_s
        self.require_client_version = require_client_version
        self.supported_versions = supported_versions
        self.max_page_size = max_page_size
        self.hang_s = 3600.0

        self.requests_by_status: collections.Counter[int] = collections.Counter()
        self.in_flight: dict[str, int] = dict.fromkeys(self.tenants, 0)
        self.max_in_flight: dict[str, int] = dict.fromkeys(self.tenants, 0)
        self.request_log: collections.deque[RequestRecord] = collections.deque(
            maxlen=REQUEST_LOG_SIZE
        )
        self.token_grants: collections.Counter[str] = collections.Counter()
        self.issued_tokens: collections.deque[str] = collections.deque(maxlen=_ISSUED_TOKENS_KEPT)
        self.faults_fired: collections.Counter[str] = collections.Counter()

        # Separate streams so that, e.g., unsorted requests do not shift which faults fire.
        self._fault_rng = random.Random(f"{seed}:faults")  # noqa: S311 - simulation only
        self._order_rng = random.Random(f"{seed}:order")  # noqa: S311 - simulation only
        self._data_rng = random.Random(f"{seed}:data")  # noqa: S311 - simulation only
        self._faults: list[_ArmedFault] = []
        self._access_tokens: dict[str, _Token] = {}
        self._refresh_tokens: dict[str, str] = {}
        self._views: dict[str, dict[tuple[Any, ...], list[dict[str, str]]]] = {}
        self._pages: dict[str, dict[tuple[Any, ...], bytes]] = {}
        self._async_actions: collections.OrderedDict[str, AsyncAction] = collections.OrderedDict()

    # --- scripting -------------------------------------------------------------------------

    def inject(self, fault: Fault) -> None:
        """Arms `fault`; faults are checked in the order they were injected."""
        if fault.tenant is not None and fault.tenant not in self.tenants:
            raise ValueError(f"unknown tenant {fault.tenant!r}")
        self._faults.append(_ArmedFault(fault, fault.times))

    def clear_faults(self) -> None:
        """Disarms every fault."""
        self._faults.clear()

    def revoke_tokens(self, tenant: str | None = None) -> None:
        """Invalidates every issued access and refresh token (of `tenant`, or of everyone).
        API keys stay valid."""
        self._access_tokens = {
            token: issued
            for token, issued in self._access_tokens.items()
            if tenant is not None and issued.tenant != tenant
        }
        self._refresh_tokens = {
            token: owner
            for token, owner in self._refresh_tokens.items()
            if tenant is not None and owner != tenant
        }

    def invalidate(self, tenant: str | None = None) -> None:
        """Drops cached views and pages (after editing `SimTenant.items` directly)."""
        if tenant is None:
            self._views.clear()
            self._pages.clear()
        else:
            self._views.pop(tenant, None)
            self._pages.pop(tenant, None)

    def reset_observations(self) -> None:
        """Clears counters and the request log (not data, tokens or faults)."""
        self.requests_by_status.clear()
        self.request_log.clear()
        self.token_grants.clear()
        self.issued_tokens.clear()
        self.faults_fired.clear()
        self.max_in_flight = dict(self.in_flight)

    # --- churn -----------------------------------------------------------------------------

    def add_pairs(self, tenant: str, n: int) -> list[dict[str, str]]:
        """Adds `n` new pairs to `tenant`: new copy jobs, or new sources of existing ones."""
        items = self.tenants[tenant].items
        existing = {(i["jobUid"], i["linkedJobUid"], i.get("uniqueJobUid")) for i in items}
        added: list[dict[str, str]] = []
        sources: list[str] = []
        rng = self._data_rng
        while len(added) < n:
            if items and rng.random() < 0.3:
                template = rng.choice(items)
                item = {"jobUid": template["jobUid"], "linkedJobUid": _uuid4(rng)}
                if "uniqueJobUid" in template:
                    item["uniqueJobUid"] = template["uniqueJobUid"]
                candidates = [item]
            else:
                candidates = _copy_job_items(rng, sources, 0.9, rng.randint(1, 3))
            for item in candidates[: n - len(added)]:
                key = (item["jobUid"], item["linkedJobUid"], item.get("uniqueJobUid"))
                if key not in existing:
                    existing.add(key)
                    added.append(item)
        items.extend(added)
        self.invalidate(tenant)
        return added

    def remove_pairs(self, tenant: str, n: int) -> list[dict[str, str]]:
        """Removes `n` random pairs (or all, if fewer) from `tenant`; returns them."""
        items = self.tenants[tenant].items
        doomed = set(self._data_rng.sample(range(len(items)), min(n, len(items))))
        removed = [item for index, item in enumerate(items) if index in doomed]
        items[:] = [item for index, item in enumerate(items) if index not in doomed]
        self.invalidate(tenant)
        return removed

    def churn(self, tenant: str, fraction: float) -> tuple[int, int]:
        """Removes, then adds, `fraction` of `tenant`'s pairs; returns (removed, added)."""
        count = round(len(self.tenants[tenant].items) * fraction)
        removed = self.remove_pairs(tenant, count)
        added = self.add_pairs(tenant, count)
        return len(removed), len(added)

    # --- auth ------------------------------------------------------------------------------

    def authenticate(self, header: str | None) -> tuple[str, str] | None:
        """(tenant, credential kind) for an Authorization header value, if it is valid; the
        kind is "api_key" or "access_token"."""
        scheme, _, credential = (header or "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return None
        tenant = self._by_api_key.get(credential)
        if tenant is not None:
            return tenant, "api_key"
        token = self._access_tokens.get(credential)
        if token is None:
            return None
        if token.expires_at <= time.monotonic():
            del self._access_tokens[credential]
            return None
        return token.tenant, "access_token"

    def tenant_by_username(self, username: str) -> str | None:
        """The tenant whose account is `username`, if there is one."""
        return self._by_username.get(username)

    def refresh_token_owner(self, refresh_token: str) -> str | None:
        """The tenant a valid refresh token belongs to, without spending the token."""
        return self._refresh_tokens.get(refresh_token)

    def redeem_refresh_token(self, refresh_token: str) -> str | None:
        """Spends a refresh token (they rotate); its tenant, or None if it is not valid."""
        return self._refresh_tokens.pop(refresh_token, None)

    def issue_tokens(self, tenant: str, grant: str) -> TokenPair:
        """A new access and refresh token for `tenant`, counted in `token_grants[grant]`."""
        access = f"sim-at-{secrets.token_urlsafe(24)}"
        refresh = f"sim-rt-{secrets.token_urlsafe(24)}"
        self._access_tokens[access] = _Token(tenant, time.monotonic() + self.token_lifetime_s)
        self._refresh_tokens[refresh] = tenant
        self.token_grants[grant] += 1
        self.issued_tokens.extend((access, refresh))
        # Rounded up so a short test lifetime is never advertised as 0.
        return TokenPair(access, refresh, math.ceil(self.token_lifetime_s))

    # --- faults ----------------------------------------------------------------------------

    def take_fault(
        self, tenant: str | None, offset: int | None, kinds: frozenset[FaultKind]
    ) -> tuple[float, Fault | None]:
        """For a request of `tenant` at `offset` (None: the token endpoint), among faults of
        `kinds`: (total latency to add, the one other fault to apply), consuming what fires."""
        delay_s = 0.0
        chosen: Fault | None = None
        for armed in self._faults:
            fault = armed.fault
            if armed.remaining == 0 or fault.kind not in kinds:
                continue
            if fault.tenant is not None and fault.tenant != tenant:
                continue
            if fault.offset is not None and fault.offset != offset:
                continue
            if chosen is not None and fault.kind != FaultKind.LATENCY:
                continue
            if fault.probability < 1.0 and self._fault_rng.random() >= fault.probability:
                continue
            if armed.remaining is not None:
                armed.remaining -= 1
            self.faults_fired[fault.kind.value] += 1
            if fault.kind == FaultKind.LATENCY:
                delay_s += fault.delay_s
            else:
                chosen = fault
        self._faults = [armed for armed in self._faults if armed.remaining != 0]
        return delay_s, chosen

    # --- pages -----------------------------------------------------------------------------

    def _view(self, tenant: str, query: PageQuery) -> list[dict[str, str]]:
        """The tenant's items, filtered and (when asked) sorted; cached until data changes."""
        views = self._views.setdefault(tenant, {})
        key = (query.sort, query.filter_key)
        view = views.get(key)
        if view is None:
            items = self.tenants[tenant].items
            predicate = query.predicate
            view = [item for item in items if predicate(item)] if predicate else list(items)
            # Stable sorts, last key first, give a multi-key sort; missing values sort first.
            for name, descending in reversed(query.sort):
                view.sort(key=_sort_key(name), reverse=descending)
            views[key] = view
        return view

    def page_document(self, tenant: str, query: PageQuery) -> dict[str, Any]:
        """The page `query` asks of `tenant`'s items, as a fresh document a caller may edit
        (the items themselves are shared: replace them, do not change them)."""
        view = self._view(tenant, query)
        total = len(view)
        if query.sort:
            data = view[query.offset : query.offset + query.limit]
        else:
            count = max(0, min(query.limit, total - query.offset))
            data = self._order_rng.sample(view, count)
        if query.select:
            data = [{name: item[name] for name in query.select if name in item} for item in data]
        return {
            "meta": {"pagingInfo": {"total": total, "count": len(data), "offset": query.offset}},
            "data": data,
            "errors": None,
        }

    def page_body(self, tenant: str, query: PageQuery) -> bytes:
        """`page_document` as JSON; sorted pages are cached until the tenant's data changes."""
        if not query.sort:
            return orjson.dumps(self.page_document(tenant, query))
        pages = self._pages.setdefault(tenant, {})
        key = (query.offset, query.limit, query.sort, query.filter_key, query.select)
        body = pages.get(key)
        if body is None:
            if len(pages) >= _PAGE_CACHE_ENTRIES:
                pages.clear()
            body = pages[key] = orjson.dumps(self.page_document(tenant, query))
        return body

    @contextlib.contextmanager
    def serving_page(self, tenant: str) -> Iterator[None]:
        """Counts a jobObjects request of `tenant` in `in_flight` while it is answered."""
        self.in_flight[tenant] += 1
        self.max_in_flight[tenant] = max(self.max_in_flight[tenant], self.in_flight[tenant])
        try:
            yield
        finally:
            self.in_flight[tenant] -= 1

    # --- async actions ---------------------------------------------------------------------

    def new_async_action(self, tenant: str, body: bytes, polls: int) -> str:
        """Queues `body` as the answer of a new async action of `tenant`; returns its id."""
        action_id = str(uuid.uuid4())
        self._async_actions[action_id] = AsyncAction(tenant, body, polls)
        while len(self._async_actions) > _ASYNC_ACTIONS_KEPT:
            self._async_actions.popitem(last=False)
        return action_id

    def async_action(self, action_id: str, tenant: str) -> AsyncAction | None:
        """The async action `tenant` queued as `action_id`, while it is kept."""
        action = self._async_actions.get(action_id)
        return action if action is not None and action.tenant == tenant else None


# --- fault handlers --------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultContext:
    """The request a fault answers, and what its handler may use to answer it."""

    state: SimulatorState
    tenant: str | None
    headers: Mapping[str, str]
    sleep: Callable[[float], Awaitable[None]]
    """Sleeps, but returns early when the server shuts down."""
    query: PageQuery | None = None
    """A jobObjects request's query; None at the token endpoint."""
    form: Mapping[str, str] | None = None
    """The token endpoint's form fields; None for a jobObjects request."""

    def page(self) -> tuple[str, PageQuery]:
        """(tenant, query) of the jobObjects request being answered."""
        # Page faults are not in TOKEN_FAULT_KINDS, so they never fire at the token endpoint.
        assert self.tenant is not None and self.query is not None, "not a jobObjects request"
        return self.tenant, self.query

    def page_body(self) -> bytes:
        """The body the request would get without a fault."""
        tenant, query = self.page()
        return self.state.page_body(tenant, query)


FaultHandler = Callable[[Fault, FaultContext], Awaitable[web.Response]]


async def _throttled(fault: Fault, context: FaultContext) -> web.Response:
    extra: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if fault.retry_after_s is not None:
        if fault.retry_after_in in ("body", "both"):
            extra["retryAfter"] = _number(fault.retry_after_s)
        if fault.retry_after_in in ("header", "both"):
            headers["Retry-After"] = str(_number(fault.retry_after_s))
    body = _error_body(429, "Too many requests", "transport", **extra)
    return _json_response(429, body, headers)


async def _server_error(fault: Fault, context: FaultContext) -> web.Response:
    return _vspc_error(500, "Internal server error", fault.error_type or "transport")


async def _status(fault: Fault, context: FaultContext) -> web.Response:
    assert fault.status is not None
    message = f"Simulated error {fault.status}"
    return _vspc_error(fault.status, message, fault.error_type or "logical")


async def _forbidden(fault: Fault, context: FaultContext) -> web.Response:
    return _vspc_error(403, "Access denied: insufficient rights", "security")


async def _unauthorized(fault: Fault, context: FaultContext) -> web.Response:
    return _vspc_error(401, "Authentication failed: token was revoked", "security")


async def _queue_async_action(fault: Fault, context: FaultContext) -> web.Response:
    tenant, _ = context.page()
    action_id = context.state.new_async_action(tenant, context.page_body(), fault.polls)
    return _async_running(action_id)


async def _hang(fault: Fault, context: FaultContext) -> web.Response:
    await context.sleep(context.state.hang_s)
    return _vspc_error(500, "The server is shutting down", "transport")


async def _malformed_json(fault: Fault, context: FaultContext) -> web.Response:
    return _json_response(200, b'{"meta": {"pagingInfo": {"total": 3,, "data": [')


async def _truncated(fault: Fault, context: FaultContext) -> web.Response:
    body = context.page_body()
    # web.Response sets Content-Length from the cut body: a JSON error, not EOF.
    return _json_response(200, body[: len(body) // 2])


async def _wrong_offset(fault: Fault, context: FaultContext) -> web.Response:
    tenant, query = context.page()
    first_page = dataclasses.replace(query, offset=0)
    return _json_response(200, context.state.page_body(tenant, first_page))


async def _drift(fault: Fault, context: FaultContext) -> web.Response:
    tenant, _ = context.page()
    body = context.page_body()
    context.state.remove_pairs(tenant, 1)
    context.state.add_pairs(tenant, 1)
    return _json_response(200, body)


async def _oversized_body(fault: Fault, context: FaultContext) -> web.Response:
    return _json_response(200, _padded_page(context.page_body(), fault.size_bytes))


async def _gzip_bomb_body(fault: Fault, context: FaultContext) -> web.Response:
    bomb = _gzip_bomb(context.page_body(), fault.size_bytes)
    return _json_response(200, bomb, {"Content-Encoding": "gzip"})


async def _echo_secret(fault: Fault, context: FaultContext) -> web.Response:
    if context.form is not None:
        sent = ", ".join(f"{key}={value}" for key, value in context.form.items())
        return _oauth_error("invalid_request", f"Cannot parse the request: {sent}")
    header = context.headers.get("Authorization", "")
    message = f"Malformed request header: Authorization: {header}"
    return _error_in_shape(fault.status or 400, message, fault.shape)


async def _message(fault: Fault, context: FaultContext) -> web.Response:
    return _error_in_shape(fault.status or 400, fault.message, fault.shape)


def _damaged_page(damage: Callable[[Fault, dict[str, Any]], None]) -> FaultHandler:
    """A handler answering 200 with the request's page document as `damage` leaves it."""

    async def handler(fault: Fault, context: FaultContext) -> web.Response:
        tenant, query = context.page()
        document = context.state.page_document(tenant, query)
        damage(fault, document)
        return _json_response(200, orjson.dumps(document))

    return handler


def _bad_uuid(fault: Fault, document: dict[str, Any]) -> None:
    data: list[dict[str, str]] = document["data"]
    if data:
        data[len(data) // 2] = {**data[len(data) // 2], "jobUid": "not-a-uuid"}


def _missing_field(fault: Fault, document: dict[str, Any]) -> None:
    data: list[dict[str, str]] = document["data"]
    if data:
        item = dict(data[len(data) // 2])
        item.pop("linkedJobUid", None)
        data[len(data) // 2] = item


def _wrong_total(fault: Fault, document: dict[str, Any]) -> None:
    document["meta"]["pagingInfo"]["total"] += 7


def _wrong_count(fault: Fault, document: dict[str, Any]) -> None:
    document["meta"]["pagingInfo"]["count"] = len(document["data"]) + 1


def _null_meta(fault: Fault, document: dict[str, Any]) -> None:
    document["meta"] = None


def _huge_total(fault: Fault, document: dict[str, Any]) -> None:
    document["meta"]["pagingInfo"]["total"] = fault.total


def _short_page(fault: Fault, document: dict[str, Any]) -> None:
    document["data"] = document["data"][:1]
    document["meta"]["pagingInfo"]["count"] = len(document["data"])


# LATENCY has none: `take_fault` turns it into a delay before whatever answers.
FAULT_HANDLERS: Mapping[FaultKind, FaultHandler] = {
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


async def answer_fault(fault: Fault, context: FaultContext) -> web.Response:
    """The response `fault` gives the request in `context`, in place of the normal one."""
    return await FAULT_HANDLERS[fault.kind](fault, context)


class _Api:
    """Request handling for one application; `state` may outlive it."""

    def __init__(self, state: SimulatorState) -> None:
        self.state = state
        self.stopping = asyncio.Event()

    async def on_shutdown(self, app: web.Application) -> None:
        self.stopping.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleeps, but wakes early when the server shuts down (so shutdown is quick)."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), seconds)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every request comes through here: record it, check the version, route it."""
        headers = CIMultiDict(request.headers)
        if "Authorization" in headers:
            scheme = headers["Authorization"].partition(" ")[0]
            headers["Authorization"] = f"{scheme} [redacted]"
        record = RequestRecord(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=headers,
            started_at=time.monotonic(),
        )
        self.state.request_log.append(record)
        try:
            response = await self._route(request, record)
        except Exception:
            _log.exception("simulator bug while answering %s %s", request.method, request.path)
            response = _vspc_error(500, "Internal error in the simulator", "unspecified")
        record.status = response.status
        record.duration_s = time.monotonic() - record.started_at
        self.state.requests_by_status[response.status] += 1
        return response

    async def _route(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if not path.startswith(API_PREFIX + "/"):
            return _vspc_error(404, f"No resource at {request.path}", "logical")
        if self.state.require_client_version:
            version = request.headers.get("X-Client-Version")
            if version not in self.state.supported_versions:
                supported = ", ".join(self.state.supported_versions)
                message = (
                    f"API version {version!r} is not supported; supported versions: {supported}"
                    if version
                    else f"X-Client-Version header is required; supported versions: {supported}"
                )
                body = {"error": {"code": "UnsupportedApiVersion", "message": message}}
                return _json_response(400, orjson.dumps(body))
        if path == TOKEN_PATH:
            if request.method != "POST":
                return _vspc_error(405, "Method not allowed", "logical")
            return await self._token(request, record)

        identity = self.state.authenticate(request.headers.get("Authorization"))
        if identity is None:
            return _vspc_error(401, "Authentication failed: missing or invalid token", "security")
        tenant, record.credential = identity
        record.tenant = tenant
        if request.method not in ("GET", "HEAD"):
            if self.state.tenants[tenant].read_only_key and record.credential == "api_key":
                return _vspc_error(403, "The API key is read-only", "security")
            return _vspc_error(405, "Method not allowed", "logical")
        if path == JOB_OBJECTS_PATH:
            return await self._job_objects(request, tenant)
        if path.startswith(ASYNC_ACTIONS_PATH + "/"):
            return self._async_action(path.removeprefix(ASYNC_ACTIONS_PATH + "/"), tenant)
        return _vspc_error(404, f"No resource at {request.path}", "logical")

    async def _token(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        state = self.state
        if request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
            return _oauth_error("invalid_request", "Expected a form-encoded body")
        form = await request.post()
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        grant = fields.get("grant_type")
        tenant: str | None = None
        if grant == "password":
            tenant = state.tenant_by_username(fields.get("username", ""))
        elif grant == "refresh_token":
            tenant = state.refresh_token_owner(fields.get("refresh_token", ""))
        record.tenant = tenant

        delay_s, fault = state.take_fault(tenant, None, TOKEN_FAULT_KINDS)
        await self._sleep(delay_s)
        if fault is not None:
            context = FaultContext(state, tenant, request.headers, self._sleep, form=fields)
            return await answer_fault(fault, context)

        if not grant:
            return _oauth_error("invalid_request", "grant_type is required")
        if grant == "password":
            username, password = fields.get("username"), fields.get("password")
            if not username or not password:
                return _oauth_error("invalid_request", "username and password are required")
            account = state.tenants.get(tenant) if tenant else None
            if account is None or not secrets.compare_digest(account.password, password):
                return _oauth_error(
                    "invalid_grant",
                    "Cannot complete login due to incorrect username or password, "
                    "or no sufficient rights.",
                )
            if account.mfa:
                return _oauth_error(
                    "invalid_grant",
                    "Multi-factor authentication is enabled for this account; "
                    "the password grant cannot be used, use an API key.",
                )
            return _token_response(state.issue_tokens(account.name, "password"))
        if grant == "refresh_token":
            refresh = fields.get("refresh_token")
            if not refresh:
                return _oauth_error("invalid_request", "refresh_token is required")
            owner = state.redeem_refresh_token(refresh)
            if owner is None:
                return _oauth_error("invalid_grant", "The refresh token is invalid or expired")
            return _token_response(state.issue_tokens(owner, "refresh_token"))
        return _oauth_error("unsupported_grant_type", f"Grant type {grant!r} is not supported")

    async def _job_objects(self, request: web.Request, tenant: str) -> web.StreamResponse:
        state = self.state
        with state.serving_page(tenant):
            try:
                query = parse_query(request.query, state.max_page_size)
            except BadQuery as exc:
                return _vspc_error(400, str(exc), "logical")
            delay_s, fault = state.take_fault(tenant, query.offset, FAULT_KINDS)
            await self._sleep(delay_s)
            if fault is None:
                return _json_response(200, state.page_body(tenant, query))
            context = FaultContext(state, tenant, request.headers, self._sleep, query=query)
            return await answer_fault(fault, context)

    def _async_action(self, action_id: str, tenant: str) -> web.Response:
        action = self.state.async_action(action_id, tenant)
        if action is None:
            return _vspc_error(404, f"Async action {action_id} not found", "logical")
        body = action.poll()
        return _async_running(action_id) if body is None else _json_response(200, body)


def create_app(state: SimulatorState) -> web.Application:
    """The simulator as an aiohttp application (every path goes through one handler)."""
    api = _Api(state)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api.handle)
    app.on_shutdown.append(api.on_shutdown)
    return app


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):  # noqa: S104 - reading the bind address, not choosing it
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


@asynccontextmanager
async def run_simulator(
    state: SimulatorState,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[str]:
    """Serves `state` on a real socket; yields the server root, e.g. "http://127.0.0.1:PORT"."""
    # handler_cancellation: a client that gives up on a "hang" ends that handler.
    runner = web.AppRunner(create_app(state), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound_port = runner.addresses[0][1]
        scheme = "https" if ssl_context is not None else "http"
        yield f"{scheme}://{_url_host(host)}:{bound_port}"
    finally:
        await runner.cleanup()


def _config_snippet(url: str, tenants: Sequence[SimTenant]) -> str:
    blocks = [
        f'[[tenants]]\nname = "{tenant.name}"\nurl = "{url}"\napi_key = "{tenant.api_key}"\n'
        f'# or: username = "{tenant.username}"  password = "{tenant.password}"'
        for tenant in tenants
    ]
    return "\n\n".join(blocks)


async def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    tenants: int = 3,
    pairs: int = 5000,
    seed: int = 0,
    token_lifetime_s: float = 3600.0,
    print_fn: Callable[[str], object] = print,
) -> None:
    """Serves a generated dataset until cancelled (`syncd simulate`); prints a config snippet.

    The API keys printed are the simulator's own, made up from `seed`.
    """
    dataset = make_dataset(tenants=tenants, pairs_per_tenant=pairs, seed=seed)
    state = SimulatorState(dataset, seed=seed, token_lifetime_s=token_lifetime_s)
    async with run_simulator(state, host, port) as url:
        print_fn(f"VSPC simulator serving {tenants} tenant(s) x {pairs} pairs at {url}")
        for tenant in dataset:
            print_fn(f"  {tenant.name}: api_key = {tenant.api_key}")
        print_fn("\nsyncd configuration:\n")
        print_fn(_config_snippet(url, dataset))
        await asyncio.Event().wait()


async def cmd_simulate(args: argparse.Namespace, scrubber: object) -> int:
    """`syncd simulate`: serves a generated dataset until interrupted."""
    await serve(
        host=args.host, port=args.port, tenants=args.tenants, pairs=args.pairs, seed=args.seed
    )
    return 0
