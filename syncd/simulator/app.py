"""The simulator as an aiohttp application, and the ways to run it.

One handler sees every request: it records it (Authorization redacted), checks
`X-Client-Version`, authenticates, and routes to the token endpoint, one of the collections
(`wire.COLLECTION_PATHS`; 404 for those in `unavailable_collections`) or an async action.
What it answers comes from `SimulatorState`'s public methods; when a fault fires,
`faults.answer` builds the answer instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import orjson
from aiohttp import web
from multidict import CIMultiDict

from syncd.simulator import faults, queries, wire
from syncd.simulator.dataset import LINK_COLLECTIONS, SimTenant, make_dataset
from syncd.simulator.state import RequestRecord, SimulatorState, TokenPair

_log = logging.getLogger(__name__)


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
            peer=_peer(request),
        )
        self.state.request_log.append(record)
        try:
            response = await self._route(request, record)
        except Exception:
            _log.exception("simulator bug while answering %s %s", request.method, request.path)
            response = wire.vspc_error(500, "Internal error in the simulator", "unspecified")
        record.status = response.status
        record.duration_s = time.monotonic() - record.started_at
        self.state.requests_by_status[response.status] += 1
        return response

    async def _route(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if not path.startswith(wire.API_PREFIX + "/"):
            return wire.vspc_error(404, f"No resource at {request.path}", "logical")
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
                return wire.json_response(400, orjson.dumps(body))
        if path == wire.TOKEN_PATH:
            if request.method != "POST":
                return wire.vspc_error(405, "Method not allowed", "logical")
            return await self._token(request, record)

        identity = self.state.authenticate(request.headers.get("Authorization"))
        if identity is None:
            return wire.vspc_error(
                401, "Authentication failed: missing or invalid token", "security"
            )
        tenant, record.credential = identity
        record.tenant = tenant
        if request.method not in ("GET", "HEAD"):
            if self.state.tenants[tenant].read_only_key and record.credential == "api_key":
                return wire.vspc_error(403, "The API key is read-only", "security")
            return wire.vspc_error(405, "Method not allowed", "logical")
        collection = wire.COLLECTION_OF_PATH.get(path)
        if collection is not None and collection not in self.state.unavailable_collections:
            return await self._collection(request, tenant, collection)
        if path.startswith(wire.ASYNC_ACTIONS_PATH + "/"):
            return self._async_action(path.removeprefix(wire.ASYNC_ACTIONS_PATH + "/"), tenant)
        return wire.vspc_error(404, f"No resource at {request.path}", "logical")

    async def _token(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        state = self.state
        if request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
            return wire.oauth_error("invalid_request", "Expected a form-encoded body")
        form = await request.post()
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        grant = fields.get("grant_type")
        tenant: str | None = None
        if grant == "password":
            tenant = state.tenant_by_username(fields.get("username", ""))
        elif grant == "refresh_token":
            tenant = state.refresh_token_owner(fields.get("refresh_token", ""))
        record.tenant = tenant

        delay_s, fault = state.take_fault(tenant, None, faults.TOKEN_FAULT_KINDS)
        await self._sleep(delay_s)
        if fault is not None:
            context = faults.Context(state, tenant, request.headers, self._sleep, form=fields)
            return await faults.answer(fault, context)

        if not grant:
            return wire.oauth_error("invalid_request", "grant_type is required")
        if grant == "password":
            username, password = fields.get("username"), fields.get("password")
            if not username or not password:
                return wire.oauth_error("invalid_request", "username and password are required")
            account = state.tenants.get(tenant) if tenant else None
            if account is None or not secrets.compare_digest(account.password, password):
                return wire.oauth_error(
                    "invalid_grant",
                    "Cannot complete login due to incorrect username or password, "
                    "or no sufficient rights.",
                )
            if account.mfa:
                return wire.oauth_error(
                    "invalid_grant",
                    "Multi-factor authentication is enabled for this account; "
                    "the password grant cannot be used, use an API key.",
                )
            return _token_response(state.issue_tokens(account.name, "password"))
        if grant == "refresh_token":
            refresh = fields.get("refresh_token")
            if not refresh:
                return wire.oauth_error("invalid_request", "refresh_token is required")
            owner = state.redeem_refresh_token(refresh)
            if owner is None:
                return wire.oauth_error("invalid_grant", "The refresh token is invalid or expired")
            return _token_response(state.issue_tokens(owner, "refresh_token"))
        return wire.oauth_error("unsupported_grant_type", f"Grant type {grant!r} is not supported")

    async def _collection(
        self, request: web.Request, tenant: str, collection: str
    ) -> web.StreamResponse:
        state = self.state
        properties = (
            queries.PROPERTIES if collection in LINK_COLLECTIONS else queries.CATALOG_PROPERTIES
        )
        with state.serving_page(tenant):
            try:
                query = queries.parse(request.query, state.max_page_size, properties)
            except queries.BadQuery as exc:
                return wire.vspc_error(400, str(exc), "logical")
            delay_s, fault = state.take_fault(tenant, query.offset, faults.FAULT_KINDS, collection)
            await self._sleep(delay_s)
            if fault is None:
                return wire.json_response(200, state.page_body(tenant, query, collection))
            context = faults.Context(
                state, tenant, request.headers, self._sleep, query=query, collection=collection
            )
            return await faults.answer(fault, context)

    def _async_action(self, action_id: str, tenant: str) -> web.Response:
        action = self.state.async_action(action_id, tenant)
        if action is None:
            return wire.vspc_error(404, f"Async action {action_id} not found", "logical")
        body = action.poll()
        return wire.async_running(action_id) if body is None else wire.json_response(200, body)


def _token_response(tokens: TokenPair) -> web.Response:
    body = {
        "access_token": tokens.access_token,
        "token_type": "bearer",
        "refresh_token": tokens.refresh_token,
        "expires_in": tokens.expires_in_s,
    }
    return wire.json_response(200, orjson.dumps(body))


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
    # Immediate backup copy links too, a tenth as many: every collection has data.
    dataset = make_dataset(
        tenants=tenants, pairs_per_tenant=pairs, seed=seed, immediate_pairs_per_tenant=pairs // 10
    )
    state = SimulatorState(dataset, seed=seed, token_lifetime_s=token_lifetime_s)
    async with run_simulator(state, host, port) as url:
        print_fn(
            f"VSPC simulator serving {tenants} tenant(s) x {pairs} periodic and {pairs // 10} "
            f"immediate pairs, with their catalog, at {url}"
        )
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


def _peer(request: web.Request) -> str | None:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return None if not peer else f"{peer[0]}:{peer[1]}"
