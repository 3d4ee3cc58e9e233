"""The daemon's HTTP endpoint: the status page `/`, `/healthz`, `/readyz`, `/metrics`, `/status`.

Views of the daemon's state: a request changes nothing (`syncd_ready` is computed when it
is scraped). Every JSON body and every string on the page passes through the secret
scrubber on its way out, as a last line of defence like the logs'.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import structlog
from aiohttp import web

from syncd import errors, history, metrics, page

log = structlog.get_logger(__name__)

PAGE = "/"
HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"
STATUS = "/status"

# The page reads the run history for its charts; past this, it shows its rows without them.
PAGE_HISTORY_TIMEOUT_S = 3.0

# The page is self-contained: no scripts, nothing loaded from anywhere (air-gapped hosts).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class HistoryReader(Protocol):
    """Reads the charts' data: the 24 hours of `tenants`, the last runs of `recent_of`
    (`history.read_history` with its engine bound)."""

    def __call__(
        self, tenants: Sequence[str], *, recent_of: Sequence[str]
    ) -> Awaitable[history.History]: ...


class DaemonView(Protocol):
    """What the endpoints read from the daemon."""

    def checks(self) -> dict[str, str | None]:
        """Readiness checks by name: None when passing, else why not."""

    def tenants(self) -> list[dict[str, Any]]:
        """Per-tenant status rows."""


def _json(body: object, *, status: int, scrub: Callable[[str], str]) -> web.Response:
    text = scrub(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    return web.Response(text=text, status=status, content_type="application/json")


def create_app(
    view: DaemonView,
    registry: metrics.Metrics,
    *,
    scrub: Callable[[str], str],
    read_history: HistoryReader | None = None,
) -> web.Application:
    """The endpoint's application, reading `view` and `registry` on every request.

    `read_history` gives the status page its charts; without it (or while the database is
    not usable) the page shows readiness and the tenants' rows only.
    """

    async def healthz(request: web.Request) -> web.Response:
        return _json({"alive": True}, status=200, scrub=scrub)

    def readiness() -> tuple[bool, dict[str, Any]]:
        checks = view.checks()
        reasons = [reason for reason in checks.values() if reason is not None]
        ready = not reasons
        body = {
            "ready": ready,
            "reason": "; ".join(reasons) if reasons else None,
            "checks": {name: reason or "ok" for name, reason in checks.items()},
        }
        return ready, body

    async def readyz(request: web.Request) -> web.Response:
        ready, body = readiness()
        return _json(body, status=200 if ready else 503, scrub=scrub)

    async def metrics_text(request: web.Request) -> web.Response:
        response = web.Response(body=registry.render())
        response.headers["Content-Type"] = metrics.CONTENT_TYPE
        return response

    async def status(request: web.Request) -> web.Response:
        _, body = readiness()
        body["tenants"] = view.tenants()
        return _json(body, status=200, scrub=scrub)

    registry.ready.set_function(lambda: 0.0 if readiness()[1]["reason"] else 1.0)

    async def charts(
        checks: dict[str, str | None], rows: list[dict[str, Any]], now: datetime
    ) -> tuple[history.History | None, str | None]:
        """(the run history, None) or (None, why the page goes without charts)."""
        if read_history is None:
            return None, "this endpoint has no database"
        database = checks.get("database") or checks.get("schema")
        if database is not None:
            return None, database
        try:
            async with asyncio.timeout(PAGE_HISTORY_TIMEOUT_S):
                return (
                    await read_history(
                        [str(row["tenant"]) for row in rows],
                        recent_of=page.detailed(rows, now),
                    ),
                    None,
                )
        except errors.DatabaseError as exc:
            log.warning("status page without charts", error=scrub(str(exc)))
            return None, str(exc)
        except TimeoutError:
            return None, f"the run history took longer than {PAGE_HISTORY_TIMEOUT_S:g}s"

    async def status_page(request: web.Request) -> web.Response:
        checks = view.checks()
        rows = view.tenants()
        now = datetime.now(UTC)
        found, problem = await charts(checks, rows, now)
        data = page.PageData(
            checks=checks,
            tenants=rows,
            now=now,
            history=found,
            history_problem=problem,
        )
        response = web.Response(
            text=page.render(data, scrub=scrub), content_type="text/html", charset="utf-8"
        )
        response.headers.update(PAGE_HEADERS)
        response.enable_compression()
        return response

    app = web.Application()
    app.router.add_get(PAGE, status_page)
    app.router.add_get(HEALTHZ, healthz)
    app.router.add_get(READYZ, readyz)
    app.router.add_get(METRICS, metrics_text)
    app.router.add_get(STATUS, status)
    return app


@contextlib.asynccontextmanager
async def serve(app: web.Application, host: str, port: int) -> AsyncIterator[tuple[str, int]]:
    """Serves `app` on host:port until exit; yields the address actually bound.

    Raises `errors.SyncdError` when the address cannot be bound (in use, not local).
    """
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise errors.SyncdError(
                f"cannot listen on {host}:{port} for /healthz, /metrics: {exc.strerror or exc}"
            ) from exc
        bound = runner.addresses[0]
        yield str(bound[0]), int(bound[1])
    finally:
        await runner.cleanup()
