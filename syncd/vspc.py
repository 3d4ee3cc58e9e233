"""The VSPC REST API client: the only code that speaks HTTP to VSPC.

One `aiohttp.ClientSession` per tenant, owned by `open_client`, shared by the tenant's
collections (their specs, in `collections.py`, give path and sort). Requests are retried here
(decisions in `retry.py`), pages are checked and snapshots judged in `paging.py`. What
escapes this module is a `errors.TenantError` subclass (or `asyncio.CancelledError`):
aiohttp and JSON errors are translated where they happen.

Secrets (API key, password, tokens) go into request headers and form bodies only: never
into log lines, exception messages or reprs.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NoReturn, Protocol, TypeVar

import aiohttp
import orjson
import structlog
from multidict import CIMultiDictProxy
from yarl import URL

import syncd
from syncd import collections, config, errors, paging, retry
from syncd.collections import Collection

JOB_OBJECTS_PATH = collections.BACKUP_COPY_JOB_OBJECTS.path
TOKEN_PATH = "/api/v3/token"  # noqa: S105 - a path, not a password
DEFAULT_TOKEN_LIFETIME_S = 3600.0  # VSPC's default, for a token answer without expires_in
_MFA_HINTS = ("multi-factor", "multifactor", "mfa", "two-factor", "2fa")

_log = structlog.get_logger(__name__)
_stdlib_log = logging.getLogger(__name__)  # the logger `_log`'s lines go to

T = TypeVar("T")


class RequestObserver(Protocol):
    """Hook for request metrics (the daemon passes a Prometheus-backed one)."""

    def request_done(self, tenant: str, code: str) -> None:
        """A request ended: `code` is the HTTP status ("200", "429", "520", ...) or one of
        "timeout", "connection_error", "tls_error"."""

    def retry_scheduled(self, tenant: str, reason: str) -> None:
        """A request will be sent again because of `reason` ("429", "520", "timeout", ...)."""


class _NoObserver:
    def request_done(self, tenant: str, code: str) -> None:
        pass

    def retry_scheduled(self, tenant: str, reason: str) -> None:
        pass


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    credential: str | None = field(repr=False)  # the bearer value sent, to spot a stale one


@dataclass(frozen=True)
class _PageFailure:
    reason: str


def token_refresh_after_s(lifetime_s: float, margin_s: float) -> float:
    """Seconds after a grant at which to refresh a token that lives `lifetime_s`.

    `margin_s` before expiry, but never more than half the lifetime: a 60 s token with the
    default 300 s margin would otherwise be refreshed before every request.
    """
    return lifetime_s - min(margin_s, lifetime_s / 2)


SecretSink = Callable[[Iterable[str]], None]
"""Told every secret the client obtains at run time (access and refresh tokens)."""


def _ignore_secrets(secrets: Iterable[str]) -> None:
    pass


Sleep = Callable[[float], Awaitable[None]]
"""How the client waits between retries and polls (`asyncio.sleep`; tests pass a recorder)."""


HttpPool = aiohttp.BaseConnector
"""HTTP connections shared by the clients of a process (`open_http_pool`)."""


@asynccontextmanager
async def open_http_pool() -> AsyncIterator[HttpPool]:
    """HTTP connections shared by every tenant's client of a process (`open_client`'s
    `pool`), closed on exit.

    Tenants on one VSPC server (accounts of one console) then reuse each other's keep-alive
    connections instead of each run opening its own. aiohttp shares a connection only
    between requests to the same host and port with the same TLS setting. The pool bounds
    nothing itself: each client keeps its tenant to `max_concurrent_pages` pages in flight
    (plus a token request), and the callers bound the tenants synced at once.
    """
    connector = aiohttp.TCPConnector(limit=0)
    try:
        yield connector
    finally:
        await connector.close()


@asynccontextmanager
async def open_client(
    tenant: config.Tenant,
    *,
    pool: HttpPool | None = None,
    observer: RequestObserver | None = None,
    on_secret: SecretSink = _ignore_secrets,
    sleep: Sleep = asyncio.sleep,
) -> AsyncIterator[VspcClient]:
    """A client for `tenant`, owning one HTTP session that is closed on exit; its
    connections are `pool`'s (`open_http_pool`), or its own when no pool is given.

    `on_secret` receives each token the moment it arrives, before any use of it, so the
    scrubbers of logs, the database and the terminal know it. Raises
    `errors.TransportError` when the tenant's `ca_file` cannot be loaded.
    """
    settings = tenant.settings
    log = _log.bind(tenant=tenant.name)
    tls = _ssl_setting(tenant)
    if not tenant.verify_tls:
        log.warning(f"TLS verification disabled for tenant {tenant.name}")
    connector = (
        pool
        if pool is not None
        # One more than the page workers, so a token refresh never waits for a page slot.
        else aiohttp.TCPConnector(limit_per_host=settings.max_concurrent_pages + 1)
    )
    timeout = aiohttp.ClientTimeout(
        total=settings.request_timeout_s, sock_connect=settings.connect_timeout_s
    )
    async with aiohttp.ClientSession(
        connector=connector,
        connector_owner=pool is None,
        timeout=timeout,
        raise_for_status=False,
    ) as session:
        yield VspcClient(
            tenant, session, tls=tls, observer=observer, on_secret=on_secret, sleep=sleep
        )


class VspcClient:
    """Reads one tenant's collections. Build it with `open_client`."""

    def __init__(
        self,
        tenant: config.Tenant,
        session: aiohttp.ClientSession,
        *,
        tls: ssl.SSLContext | bool = True,
        observer: RequestObserver | None = None,
        on_secret: SecretSink = _ignore_secrets,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._tenant = tenant
        self._on_secret = on_secret
        self._sleep = sleep
        self._settings = tenant.settings
        self._session = session
        self._tls = tls
        self._observer: RequestObserver = observer or _NoObserver()
        self._root = URL(tenant.url.rstrip("/"))
        self._log = _log.bind(tenant=tenant.name)
        self._headers = {
            "Accept": "application/json",
            "User-Agent": f"syncd/{syncd.__version__}",
            "X-Client-Version": self._settings.client_version,
        }
        self._rng = random.Random()  # noqa: S311 - backoff jitter, not cryptography
        self._auth: _ApiKey | _PasswordSession
        if isinstance(tenant.auth, config.ApiKeyAuth):
            self._auth = _ApiKey(tenant.auth)
        else:
            self._auth = _PasswordSession(
                tenant.auth,
                grant=self._grant,
                refresh_margin_s=self._settings.token_refresh_margin_s,
                log=self._log,
            )

    def __repr__(self) -> str:
        return f"<VspcClient tenant={self._tenant.name!r} url={self._tenant.url!r}>"

    @property
    def auth_method(self) -> str:
        """How this client authenticates: "api_key" or "password"."""
        return self._tenant.auth.method

    def page_slots(self) -> asyncio.Semaphore:
        """A bound of `max_concurrent_pages` pages in flight, for snapshots that share it."""
        return asyncio.Semaphore(self._settings.max_concurrent_pages)

    async def fetch_first_page(
        self, limit: int = 1, *, collection: Collection = collections.BACKUP_COPY_JOB_OBJECTS
    ) -> paging.Page:
        """Authenticates and fetches the first page (for `syncd check`); TenantError if not,
        `CollectionUnavailable` when the server has no such collection."""
        limit = max(1, min(limit, paging.MAX_PAGE_SIZE))
        return await self._fetch_first(limit, collection, self.page_slots())

    async def fetch_snapshot(
        self,
        on_page: Callable[[paging.Page], Awaitable[None]],
        *,
        collection: Collection = collections.BACKUP_COPY_JOB_OBJECTS,
        slots: asyncio.Semaphore | None = None,
    ) -> paging.SnapshotOutcome:
        """Reads the whole `collection`, awaiting `on_page` for each page as it arrives.

        The first page decides: if it cannot be had, a `TenantError` is raised
        (`CollectionUnavailable` for a 404: the server has no such collection). Later pages
        are fetched concurrently; one that fails or fails a check makes the outcome
        incomplete but the others go on. Every page fetch, the first included, holds one of
        `slots` (default: a bound of `max_concurrent_pages` of its own): snapshots of one
        tenant's collections that share `slots` keep `max_concurrent_pages` for the whole
        tenant. `on_page` is never run concurrently with itself; if it raises, outstanding
        fetches are cancelled and the exception propagates. An `AuthError`,
        `TransportError` or `BoundExceeded` mid-snapshot also ends it (and propagates):
        every later page would fail too, and each would try the password again or read
        another oversized body.
        """
        slots = slots if slots is not None else self.page_slots()
        log = self._log.bind(collection=collection.name)
        limit = min(self._settings.page_size, paging.MAX_PAGE_SIZE)
        first = await self._fetch_first(limit, collection, slots)
        tracker = paging.SnapshotTracker(
            tenant=self._tenant.name, limit=limit, max_total=self._settings.max_total
        )
        offsets = tracker.start(first)
        log.debug("snapshot started", total=tracker.total, pages=len(offsets) + 1, page_size=limit)
        pending = iter(offsets)
        workers = min(self._settings.max_concurrent_pages, len(offsets))
        # Bounded: at most `workers` pages in flight plus `workers` waiting for on_page.
        results: asyncio.Queue[paging.Page | _PageFailure | Exception] = asyncio.Queue(
            maxsize=max(1, workers)
        )

        async def work() -> None:
            for offset in pending:
                result: paging.Page | _PageFailure | Exception
                try:
                    result = await self._fetch_page(offset, limit, tracker.total, collection, slots)
                except (errors.AuthError, errors.TransportError, errors.BoundExceeded) as exc:
                    await results.put(exc)
                    return
                except errors.TenantError as exc:
                    result = _PageFailure(str(exc))
                except Exception as exc:  # a bug: hand it to the consumer rather than hang
                    await results.put(exc)
                    return
                await results.put(result)

        tasks = [asyncio.create_task(work()) for _ in range(workers)]
        try:
            await on_page(first)
            for _ in range(len(offsets)):
                result = await results.get()
                if isinstance(result, paging.Page):
                    tracker.record(result)
                    await on_page(result)
                elif isinstance(result, _PageFailure):
                    log.warning("page failed", reason=result.reason)
                    tracker.record_failure(result.reason)
                else:
                    raise result
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        outcome = tracker.outcome()
        # Debug: a run's one info line is its tenant's "sync finished"; problems warn below.
        log.debug(
            "snapshot fetched",
            complete=outcome.complete,
            total=outcome.total,
            pages=outcome.pages_fetched,
            items_seen=outcome.items_seen,
            problems=len(outcome.problems),
        )
        for problem in outcome.problems:
            log.warning("snapshot incomplete", problem=problem)
        return outcome

    # --- one page ------------------------------------------------------------------------

    async def _fetch_first(
        self, limit: int, collection: Collection, slots: asyncio.Semaphore
    ) -> paging.Page:
        try:
            return await self._fetch_page(0, limit, None, collection, slots)
        except errors.ResourceMissing as exc:
            raise errors.CollectionUnavailable(
                f"tenant {self._tenant.name!r}: the server has no {collection.name} collection "
                f"(HTTP 404 for {collection.path}; an older VSPC)",
                collection=collection.name,
            ) from exc

    async def _fetch_page(
        self,
        offset: int,
        limit: int,
        expected_total: int | None,
        collection: Collection,
        slots: asyncio.Semaphore,
    ) -> paging.Page:
        where = f"tenant {self._tenant.name!r}, offset {offset}"
        url = self._root.with_path(self._root.path.rstrip("/") + collection.path)
        params = {"limit": str(limit), "offset": str(offset), "sort": _sort_param(collection)}
        subject = (
            "backup copy job objects"
            if collection.kind is collections.Kind.LINKS
            else collection.noun
        )

        async def attempt() -> paging.Page:
            body = await self._get(url, params, where, subject)
            try:
                return paging.parse_page(
                    body,
                    tenant=self._tenant.name,
                    offset=offset,
                    limit=limit,
                    expected_total=expected_total,
                    collection=collection,
                )
            except errors.UnreadablePage as exc:
                # Retried (unlike other page problems): a cut or garbled body is most often
                # a connection or proxy hiccup, and a GET of a page is safe to repeat. A
                # server that keeps sending it still ends as a page problem after retries.
                raise errors.RetryableError(str(exc), reason="malformed_body") from exc

        async with slots:
            return await self._with_retries(where, attempt)

    async def _get(self, url: URL, params: Mapping[str, str], where: str, subject: str) -> bytes:
        """The body of a 200 answer to GET `url`, re-authenticating once on 401 and
        following a 202 to its result. A 404 raises `errors.ResourceMissing`."""
        answer = await self._send_authorized("GET", url, where, params=params)
        if answer.status == 200:
            return answer.body
        if answer.status == 202:
            return await self._poll(answer, where)
        self._raise_for(answer, where, subject=subject, missing=True)

    async def _send_authorized(
        self, method: str, url: URL, where: str, *, params: Mapping[str, str] | None = None
    ) -> _Answer:
        """Sends with the current credential; on 401, renews it once and sends again."""
        answer = await self._send(method, url, where, params=params, authorize=True)
        if answer.status == 401 and isinstance(self._auth, _PasswordSession):
            self._observer.retry_scheduled(self._tenant.name, "401")
            self._log.info("vspc refused the access token; renewing it", where=where)
            await self._auth.renew_rejected(answer.credential)
            answer = await self._send(method, url, where, params=params, authorize=True)
            if answer.status == 401:
                self._raise_for(answer, where, after_renewal=True)
        return answer

    async def _poll(self, queued: _Answer, where: str) -> bytes:
        """Polls the async action a 202 points at until it holds the answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.async_action_timeout_s
        answer = queued
        polls = 0
        while answer.status == 202:
            location = answer.headers.get("Location")
            if not location:
                raise errors.ApiError(f"{where}: HTTP 202 without a Location header", status=202)
            url = self._root.join(URL(location))
            if url.origin() != self._root.origin():
                raise errors.ApiError(
                    f"{where}: HTTP 202 points at another server ({url.origin()}); not "
                    "following it with this tenant's credentials",
                    status=202,
                )
            wait_s = retry.backoff_s(
                polls,
                base_s=self._settings.backoff_base_s,
                cap_s=self._settings.backoff_max_s,
                jitter=0.5 + self._rng.random() / 2,  # never a tight loop of polls
            )
            if loop.time() + wait_s > deadline:
                raise errors.AsyncActionTimeout(
                    f"{where}: VSPC queued the request (HTTP 202) and did not finish it "
                    f"within {self._settings.async_action_timeout_s:g}s"
                )
            await self._sleep(wait_s)
            polls += 1
            answer = await self._send_authorized("GET", url, where)
        if answer.status == 200:
            return answer.body
        self._raise_for(answer, where)

    # --- retries and single requests -----------------------------------------------------

    async def _with_retries(self, where: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Runs `attempt` until it succeeds, retrying `RetryableError`s with backoff."""
        settings = self._settings
        retries = 0
        while True:
            try:
                return await attempt()
            except errors.RetryableError as exc:
                if retries >= settings.max_retries:
                    status = int(exc.reason) if exc.reason.isdigit() else None
                    tried = (
                        f"gave up after {retries} {'retry' if retries == 1 else 'retries'}"
                        if retries
                        else "not retried: max_retries is 0"
                    )
                    raise errors.RetriesExhausted(f"{exc} ({tried})", status=status) from exc
                wait_s = retry.delay_s(
                    retries,
                    retry_after_s=exc.retry_after_s,
                    base_s=settings.backoff_base_s,
                    cap_s=settings.backoff_max_s,
                    retry_after_max_s=settings.retry_after_max_s,
                    jitter=self._rng.random(),
                )
                self._observer.retry_scheduled(self._tenant.name, exc.reason)
                self._log.info(
                    "retrying vspc request",
                    where=where,
                    reason=exc.reason,
                    retry=retries + 1,
                    wait_s=round(wait_s, 3),
                )
                await self._sleep(wait_s)
                retries += 1

    async def _send(
        self,
        method: str,
        url: URL,
        where: str,
        *,
        params: Mapping[str, str] | None = None,
        form: Mapping[str, str] | None = None,
        authorize: bool,
    ) -> _Answer:
        """Sends one request and reads the whole answer; translates transport errors."""
        request_id = str(uuid.uuid4())
        headers = {**self._headers, "X-Request-id": request_id}
        credential = None
        if authorize:
            credential = await self._auth.bearer()
            headers["Authorization"] = f"Bearer {credential}"
        # The hot path: a page's request builds no log line (nor binds a logger) unless
        # debug logging is on, which the level check answers from the stdlib's cache.
        debug = _stdlib_log.isEnabledFor(logging.DEBUG)
        if debug:
            self._log.debug(
                "vspc request",
                request_id=request_id,
                method=method,
                url=str(url.update_query(params or {})),
            )
            started = asyncio.get_running_loop().time()
        try:
            async with self._session.request(
                method,
                url,
                params=params,
                data=form,
                headers=headers,
                allow_redirects=False,
                ssl=self._tls,
            ) as response:
                status, response_headers = response.status, response.headers
                body = await self._read_body(response, where)
        except TimeoutError as exc:
            self._observer.request_done(self._tenant.name, "timeout")
            raise errors.RetryableError(
                f"{where}: no answer from {self._root.origin()} within "
                f"{self._settings.request_timeout_s:g}s",
                reason="timeout",
            ) from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            self._observer.request_done(self._tenant.name, "tls_error")
            raise errors.TransportError(
                f"{where}: the TLS certificate of {self._root.origin()} is not trusted "
                f"({_certificate_problem(exc)}): set ca_file to the CA certificate (PEM) that "
                "signed it, or verify_tls = false to skip verification (insecure)"
            ) from exc
        except aiohttp.ClientSSLError as exc:
            self._observer.request_done(self._tenant.name, "tls_error")
            raise errors.TransportError(
                f"{where}: TLS handshake with {self._root.origin()} failed ({exc.os_error}); "
                "check the URL's scheme and port, and ca_file / verify_tls"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            self._observer.request_done(self._tenant.name, "connection_error")
            raise errors.RetryableError(
                f"{where}: cannot connect to {self._root.origin()}: {_connect_problem(exc)}",
                reason="connection_error",
            ) from exc
        except aiohttp.ClientError as exc:
            self._observer.request_done(self._tenant.name, "connection_error")
            raise errors.RetryableError(
                f"{where}: connection to {self._root.origin()} failed: {type(exc).__name__}: {exc}",
                reason="connection_error",
            ) from exc
        if debug:
            self._log.debug(
                "vspc answer",
                request_id=request_id,
                status=status,
                elapsed_ms=round((asyncio.get_running_loop().time() - started) * 1000, 1),
                size=len(body),
            )
        self._observer.request_done(self._tenant.name, str(status))
        return _Answer(status, response_headers, body, credential)

    async def _read_body(self, response: aiohttp.ClientResponse, where: str) -> bytes:
        """The body, refused past `max_body_size` before and after decompression.

        `Content-Length` (the size on the wire) is checked before reading; the decompressed
        size is counted as it streams in, so a gzip bomb stops at the cap, not in memory.
        """
        cap = self._settings.max_body_bytes
        announced = response.content_length
        if announced is not None and announced > cap:
            self._raise_too_big(where, f"Content-Length announces {announced} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > cap:
                self._raise_too_big(where, f"more than {cap} bytes arrived")
            chunks.append(chunk)
        return b"".join(chunks)

    def _raise_too_big(self, where: str, what: str) -> NoReturn:
        cap = self._settings.max_body_bytes
        raise errors.BoundExceeded(
            f"{where}: response body too large ({what}; max_body_size is {cap} bytes, "
            "decompressed): if VSPC's pages are really that big, raise [sync] max_body_size",
            key="max_body_size",
        )

    def _raise_for(
        self,
        answer: _Answer,
        where: str,
        *,
        after_renewal: bool = False,
        subject: str = "backup copy job objects",
        missing: bool = False,
    ) -> NoReturn:
        """Raises what a non-200 answer means: RetryableError, AuthError or ApiError
        (`ResourceMissing` for a 404 when `missing`: the resource asked for, not a poll)."""
        error = retry.parse_error_body(answer.body)
        detail = f"HTTP {answer.status}" + (f": {error.message}" if error.message else "")
        verdict = retry.classify(answer.status, error)
        if verdict is retry.Verdict.UNSUPPORTED_VERSION:
            raise errors.ApiError(
                f"{where}: VSPC does not support API version "
                f"{self._settings.client_version!r} ({detail}): set client_version to a "
                "version the server supports",
                status=answer.status,
            )
        if verdict is retry.Verdict.REAUTHENTICATE:
            what = (
                "still refused after renewing the access token"
                if after_renewal
                else "the API key was refused"
                if isinstance(self._auth, _ApiKey)
                else "the access token was refused"
            )
            raise errors.AuthError(f"{where}: {what} ({detail})")
        if verdict is retry.Verdict.RETRY:
            retry_after_s = error.retry_after_s
            if retry_after_s is None:
                retry_after_s = retry.parse_retry_after_header(
                    answer.headers.get("Retry-After"), now=datetime.now(UTC)
                )
            raise errors.RetryableError(
                f"{where}: {detail}", reason=str(answer.status), retry_after_s=retry_after_s
            )
        hint = ""
        if answer.status == 403:
            hint = f" (the account lacks a role that may read {subject})"
        if answer.status == 404 and missing:
            raise errors.ResourceMissing(f"{where}: {detail}", status=404)
        raise errors.ApiError(f"{where}: {detail}{hint}", status=answer.status)

    # --- token endpoint ----------------------------------------------------------------

    async def _grant(self, form: Mapping[str, str]) -> _Grant:
        """Runs one OAuth2 grant on `POST /api/v3/token` (retrying transient failures)."""
        grant_type = form["grant_type"]
        where = f"tenant {self._tenant.name!r}, token ({grant_type} grant)"
        url = self._root.with_path(self._root.path.rstrip("/") + TOKEN_PATH)

        async def attempt() -> _Grant:
            answer = await self._send("POST", url, where, form=form, authorize=False)
            if answer.status == 200:
                grant = _parse_grant(answer.body, where)
                self._on_secret(
                    [token for token in (grant.access_token, grant.refresh_token) if token]
                )
                return grant
            if answer.status in (400, 401):
                oauth = _oauth_error(answer.body)
                if oauth is not None:
                    self._raise_oauth_error(answer.status, *oauth, where=where)
            self._raise_for(answer, where)

        grant = await self._with_retries(where, attempt)
        self._log.info("vspc token granted", grant_type=grant_type, expires_in_s=grant.lifetime_s)
        return grant

    def _raise_oauth_error(
        self, status: int, error: str, description: str, *, where: str
    ) -> NoReturn:
        lowered = description.lower()
        if error == "invalid_grant" and any(hint in lowered for hint in _MFA_HINTS):
            raise errors.AuthError(
                f"{where}: the account uses multi-factor authentication (MFA), which the "
                "password grant cannot pass: configure an api_key for this tenant instead "
                f"(HTTP {status}: {description})"
            )
        raise errors.AuthError(
            f"{where}: credentials refused (HTTP {status}: {error}: {description})"
        )


@dataclass(frozen=True)
class _Grant:
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    lifetime_s: float


def _parse_grant(body: bytes, where: str) -> _Grant:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.RetryableError(
            f"{where}: token answer is not valid JSON", reason="malformed_body"
        ) from exc
    access = document.get("access_token") if isinstance(document, dict) else None
    if not isinstance(access, str) or not access:
        raise errors.AuthError(f"{where}: the token answer holds no access_token")
    refresh = document.get("refresh_token")
    expires_in = document.get("expires_in")
    lifetime_s = (
        float(expires_in)
        if isinstance(expires_in, int | float)
        and not isinstance(expires_in, bool)
        and expires_in > 0
        else DEFAULT_TOKEN_LIFETIME_S
    )
    return _Grant(access, refresh if isinstance(refresh, str) and refresh else None, lifetime_s)


def _oauth_error(body: bytes) -> tuple[str, str] | None:
    """(error, error_description) of an OAuth2 error body, if it is one; server text cleaned."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("error"), str):
        return None
    description = document.get("error_description")
    return (
        errors.clean_text(document["error"], limit=100),
        errors.clean_text(description) if isinstance(description, str) else "",
    )


_SORT_PARAMS = {c.name: paging.sort_param(c) for c in collections.COLLECTIONS.values()}


def _sort_param(collection: Collection) -> str:
    return _SORT_PARAMS.get(collection.name) or paging.sort_param(collection)


class _ApiKey:
    """A VSPC API key: sent as is, never expires, nothing to renew."""

    def __init__(self, auth: config.ApiKeyAuth) -> None:
        self._auth = auth

    def __repr__(self) -> str:
        return "<_ApiKey>"

    async def bearer(self) -> str:
        return self._auth.api_key.get_secret_value()


GrantFunction = Callable[[Mapping[str, str]], Awaitable[_Grant]]


class _PasswordSession:
    """Access and refresh tokens from the password grant, renewed before they expire.

    One lock serializes renewals, so pages fetched concurrently share one refresh instead
    of each starting its own (and invalidating each other's rotated refresh tokens).
    `grant` runs one OAuth2 grant (the client's token request, with its retries).
    """

    def __init__(
        self,
        auth: config.PasswordAuth,
        *,
        grant: GrantFunction,
        refresh_margin_s: float,
        log: structlog.stdlib.BoundLogger,
    ) -> None:
        self._auth = auth
        self._grant = grant
        self._refresh_margin_s = refresh_margin_s
        self._log = log
        self._lock = asyncio.Lock()
        self._access: str | None = None
        self._refresh: str | None = None
        self._renew_at = 0.0

    def __repr__(self) -> str:
        return f"<_PasswordSession username={self._auth.username!r}>"

    async def bearer(self) -> str:
        """The access token to send, granted or refreshed first when due."""
        if self._access is None or self._due():
            async with self._lock:
                if self._access is None or self._due():
                    await self._renew()
        assert self._access is not None
        return self._access

    async def renew_rejected(self, rejected: str | None) -> None:
        """Renews after VSPC refused `rejected` (unless another request already did)."""
        async with self._lock:
            if self._access is None or self._access == rejected:
                await self._renew()

    def _due(self) -> bool:
        return asyncio.get_running_loop().time() >= self._renew_at

    async def _renew(self) -> None:
        grant: _Grant | None = None
        if self._refresh is not None:
            try:
                grant = await self._grant(
                    {"grant_type": "refresh_token", "refresh_token": self._refresh}
                )
            except errors.AuthError as exc:
                self._log.info("token refresh refused; new password grant", reason=str(exc))
        if grant is None:
            grant = await self._grant(
                {
                    "grant_type": "password",
                    "username": self._auth.username,
                    "password": self._auth.password.get_secret_value(),
                }
            )
        self._access = grant.access_token
        # Refresh tokens rotate: the newest is the only one that still works.
        self._refresh = grant.refresh_token or self._refresh
        self._renew_at = asyncio.get_running_loop().time() + token_refresh_after_s(
            grant.lifetime_s, self._refresh_margin_s
        )


def _ssl_setting(tenant: config.Tenant) -> ssl.SSLContext | bool:
    if not tenant.verify_tls:
        return False
    if tenant.ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(tenant.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise errors.TransportError(
            f"tenant {tenant.name!r}: cannot load ca_file {tenant.ca_file}: {exc}"
        ) from exc


def _certificate_problem(exc: aiohttp.ClientConnectorCertificateError) -> str:
    certificate_error = exc.certificate_error
    message = getattr(certificate_error, "verify_message", None)
    return str(message or certificate_error)


def _connect_problem(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve host name {exc.host!r} ({exc.os_error.strerror or exc.os_error})"
    code = exc.os_error.errno
    if code == errno.ECONNREFUSED:
        return "connection refused"
    if code is not None and code in errno.errorcode:
        return os.strerror(code).lower()
    return str(exc.os_error) or type(exc.os_error).__name__
