"""The daemon's HTTP endpoint: `/healthz`, `/readyz`, `/metrics` and `/status`.

Views of the daemon's state: a request changes nothing (`syncd_ready` is computed when it
is scraped). Every JSON body passes through the secret scrubber on its way out, as a last
line of defence like the logs'.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import orjson
from aiohttp import web

from syncd import errors, metrics

HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"
STATUS = "/status"


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
    view: DaemonView, registry: metrics.Metrics, *, scrub: Callable[[str], str]
) -> web.Application:
    """The endpoint's application, reading `view` and `registry` on every request."""

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
    app = web.Application()
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
