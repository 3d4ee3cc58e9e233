"""`syncd run`: the long-running process around the scheduler.

It owns, in order of opening: signal handlers, the database engine, the HTTP endpoint, a
task watching the database, and the scheduler; they close in reverse order. Signals:

- SIGTERM / SIGINT: start no more runs, let runs in progress finish within
  `[daemon] shutdown_grace`, cancel the rest (`sync_tenant` records them as interrupted),
  close everything, exit 0. A second one exits at once (128 + signal number); runs it cuts
  short stay `running` until the tenant's next run closes them as abandoned.
- SIGHUP: reload the config file. An invalid file is rejected and logged; the running
  configuration stays. Tenants added, removed or changed are rescheduled.

An unreachable database or a schema behind head never ends the process: the daemon reports
not-ready on `/readyz`, skips runs, and re-checks with backoff.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import config, db, errors, history, logs, metrics, scheduler, store, sync, web

log = structlog.get_logger(__name__)

# Re-check a healthy database this often; an unhealthy one with backoff up to the max.
DATABASE_HEALTHY_RECHECK_S = 15.0
DATABASE_RETRY_BASE_S = 0.5
DATABASE_RETRY_MAX_S = 30.0


def database_recheck_s(consecutive_failures: int) -> float:
    """Seconds until the next database check after `consecutive_failures` failed ones."""
    if consecutive_failures <= 0:
        return DATABASE_HEALTHY_RECHECK_S
    exponent = min(consecutive_failures - 1, 30)
    return min(DATABASE_RETRY_BASE_S * 2.0**exponent, DATABASE_RETRY_MAX_S)


def restart_needed(
    running: config.Config, new: config.Config, *, listen_overridden: bool
) -> list[str]:
    """Settings of `new` that differ from the running ones but apply only at start."""
    keys = []
    if new.database.url != running.database.url:
        keys.append("database.url")
    other_database = {
        "pool_size",
        "max_concurrent_applies",
        "statement_timeout_s",
        "connect_timeout_s",
    }
    keys.extend(
        f"database.{name}"
        for name in sorted(other_database)
        if getattr(new.database, name) != getattr(running.database, name)
    )
    if not listen_overridden and new.daemon.listen != running.daemon.listen:
        keys.append("daemon.listen")
    if new.daemon.max_concurrent_tenants != running.daemon.max_concurrent_tenants:
        keys.append("daemon.max_concurrent_tenants")
    if new.daemon.replica_name != running.daemon.replica_name:
        keys.append("daemon.replica_name")
    return keys


@contextlib.asynccontextmanager
async def _background(coroutine: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Runs `coroutine` as a task for the duration of the block; cancels it on exit."""
    task = asyncio.create_task(coroutine, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Daemon:
    """One `syncd run` process. `run()` returns its exit code."""

    def __init__(
        self,
        cfg: config.Config,
        *,
        config_path: Path | None,
        scrubber: logs.SecretScrubber,
        listen_override: str | None = None,
    ) -> None:
        self._started_cfg = cfg
        self._cfg = cfg
        self._config_path = config_path
        self._scrubber = scrubber
        self._listen_override = listen_override
        self._metrics = metrics.Metrics(scrub=scrubber.scrub)
        self._events: asyncio.Queue[str] = asyncio.Queue()
        self._stop_requested = False
        self._database_problem: str | None = "not checked yet"
        self._schema_problem: str | None = None
        self._database_failures = 0
        self._recheck_database = asyncio.Event()
        self._scheduler: scheduler.TenantScheduler | None = None
        # The CLI said these at start; a reload says only what is new (or a permission).
        self._warned = {warning.subject for warning in config.config_warnings(cfg)}

    # --- web.DaemonView -------------------------------------------------------------------

    def checks(self) -> dict[str, str | None]:
        """Readiness checks: None when passing, else the reason."""
        if self._stop_requested:
            scheduler_problem: str | None = "shutting down"
        elif self._scheduler is None or not self._scheduler.running:
            scheduler_problem = "scheduler not running"
        else:
            scheduler_problem = None
        return {
            "database": self._database_problem,
            "schema": self._schema_problem,
            "scheduler": scheduler_problem,
        }

    def tenants(self) -> list[dict[str, Any]]:
        """Per-tenant status rows, in `status.TenantStatus`'s JSON form."""
        return (
            [] if self._scheduler is None else [row.as_json() for row in self._scheduler.status()]
        )

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, data_dir: Path | None, host: str, port: int) -> int:
        """Runs until SIGTERM/SIGINT; returns the exit code."""
        loop = asyncio.get_running_loop()
        # Alembic announces its context at INFO on every schema check: noise in a daemon.
        logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
        with self._signal_handlers(loop):
            async with db.open_configured_engine(
                self._cfg, data_dir, synchronous_commit=False
            ) as engine:
                await self.serve(engine, host, port)
        log.info("syncd stopped")
        return errors.EXIT_OK

    async def serve(
        self,
        engine: AsyncEngine,
        host: str,
        port: int,
        *,
        on_listening: Callable[[str, int], None] | None = None,
    ) -> None:
        """Serves the endpoint and runs the scheduler on `engine` until `stop()`.

        The daemon without its process: no signal handlers, no engine of its own, so a
        test can run it in-process. `on_listening` receives the address actually bound.
        """
        async with contextlib.AsyncExitStack() as stack:
            app = web.create_app(
                self,
                self._metrics,
                scrub=self._scrubber.scrub,
                read_history=functools.partial(history.read_history, engine),
            )
            bound_host, bound_port = await stack.enter_async_context(web.serve(app, host, port))
            log.info(
                "http endpoint listening",
                url=f"http://{bound_host}:{bound_port}",
                host=bound_host,
                port=bound_port,
            )
            if on_listening is not None:
                on_listening(bound_host, bound_port)
            await self._check_database(engine)
            await stack.enter_async_context(
                _background(self._watch_database(engine), "syncd-database-watch")
            )

            replica = self._cfg.daemon.replica()
            shared = await stack.enter_async_context(
                sync.open_shared(self._cfg.database.max_concurrent_applies)
            )

            async def sync_one(tenant: config.Tenant) -> sync.SyncResult:
                return await sync.sync_tenant(
                    tenant,
                    engine,
                    observer=self._metrics,
                    scrubber=self._scrubber,
                    replica=replica,
                    shared=shared,
                )

            self._scheduler = await stack.enter_async_context(
                scheduler.open_scheduler(
                    self._cfg.tenants,
                    sync=sync_one,
                    engine=engine,
                    daemon=self._cfg.daemon.model_copy(update={"replica_name": replica}),
                    sync_metrics=self._metrics,
                    blocked=self._blocked,
                    on_database_error=self._recheck_database.set,
                    grace_s=lambda: self._cfg.daemon.shutdown_grace_s,
                )
            )
            if self._blocked() is None:
                await self._refresh_from_database(engine, self._scheduler)
            if not self._cfg.tenants:
                log.warning("no tenants configured: add [[tenants]] and send SIGHUP")
            log.info(
                "syncd running",
                tenants=len(self._cfg.tenants),
                max_concurrent_tenants=self._cfg.daemon.max_concurrent_tenants,
                pid=os.getpid(),
                replica=replica,
            )
            await self._handle_events()
            log.info("stopping", grace_s=self._cfg.daemon.shutdown_grace_s)

    def stop(self) -> None:
        """Asks `serve` to stop gracefully (what SIGTERM does)."""
        self._stop_requested = True
        self._events.put_nowait("stop")

    def reload(self) -> None:
        """Asks `serve` to reload the config file (what SIGHUP does)."""
        self._events.put_nowait("reload")

    @contextlib.contextmanager
    def _signal_handlers(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        stop_signals = (signal.SIGTERM, signal.SIGINT)
        for signum in stop_signals:
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            yield
        finally:
            for signum in (*stop_signals, signal.SIGHUP):
                loop.remove_signal_handler(signum)

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stop_requested:
            # The operator wants out now: no grace, no cleanup that could hang.
            log.warning("second stop signal: exiting at once", signal=name)
            os._exit(128 + signum)
        log.info("stop signal received", signal=name)
        self.stop()

    async def _handle_events(self) -> None:
        while True:
            event = await self._events.get()
            if event == "stop":
                return
            await self._reload()

    # --- reload --------------------------------------------------------------------------

    async def _reload(self) -> None:
        path = self._config_path
        if path is None:
            log.warning("SIGHUP ignored: syncd was not started from a config file")
            return
        log.info("reloading configuration", path=str(path))
        try:
            new = await asyncio.to_thread(config.load_config, path)
        except errors.ConfigError as exc:
            self._metrics.config_reloads.labels(result="rejected").inc()
            log.error(
                "configuration rejected; the running one stays in force",
                path=str(path),
                problems=list(exc.problems),
            )
            return
        self._scrubber.register(new.secrets())
        for warning in config.config_warnings(new):
            if warning.repeat_on_reload or warning.subject not in self._warned:
                logs.log_config_warning(log, warning)
                self._warned.add(warning.subject)
        pending = restart_needed(
            self._started_cfg, new, listen_overridden=self._listen_override is not None
        )
        if pending:
            log.warning(
                "some changed settings apply only at start: restart syncd to apply them",
                settings=pending,
            )
        assert self._scheduler is not None
        plan = self._scheduler.apply(new.tenants, new.daemon, reload=True)
        self._cfg = new
        self._metrics.config_reloads.labels(result="applied").inc()
        log.info(
            "configuration reloaded",
            added=list(plan.added),
            removed=list(plan.removed),
            changed=list(plan.changed),
            unchanged=len(plan.unchanged),
        )

    # --- database ------------------------------------------------------------------------

    def _blocked(self) -> str | None:
        return self._database_problem or self._schema_problem

    async def _check_database(self, engine: AsyncEngine) -> None:
        """Updates readiness from one look at the database; logs only the changes."""
        before = self._blocked()
        try:
            await db.require_schema_at_head(engine)
        except errors.SchemaBehindError as exc:
            self._database_problem, self._schema_problem = None, str(exc)
        except errors.DatabaseError as exc:
            self._database_problem, self._schema_problem = str(exc), None
        except Exception as exc:
            # Whatever the driver raised, the answer is "not ready", never a crash.
            self._database_problem = f"database check failed: {exc!r}"
            self._schema_problem = None
        else:
            self._database_problem = self._schema_problem = None
        after = self._blocked()
        self._metrics.database_checks.labels(result="ok" if after is None else "failed").inc()
        self._database_failures = 0 if after is None else self._database_failures + 1
        if after is None:
            if self._scheduler is not None:
                await self._refresh_from_database(engine, self._scheduler)
            if before is not None:
                log.info("database ready", previously=before)
                if self._scheduler is not None:
                    self._scheduler.run_waiting_soon()
        elif after != before:
            log.error(
                "not ready: runs wait until the database is usable",
                reason=after,
                retry_in_s=database_recheck_s(self._database_failures),
            )

    async def _refresh_from_database(
        self, engine: AsyncEngine, tenant_scheduler: scheduler.TenantScheduler
    ) -> None:
        """Each tenant's stored state, for `/status` and the gauges: at start (runs before
        this process), then at every database check (runs of the other replicas)."""
        try:
            tenant_scheduler.refresh(await store.read_tenant_status(engine))
        except errors.DatabaseError as exc:
            log.warning("could not read the stored tenant status; trying again", error=str(exc))

    async def _watch_database(self, engine: AsyncEngine) -> None:
        while True:
            delay_s = database_recheck_s(self._database_failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recheck_database.wait(), delay_s)
            self._recheck_database.clear()
            await self._check_database(engine)


async def cmd_run(
    args: argparse.Namespace, cfg: config.Config, scrubber: logs.SecretScrubber
) -> int:
    """`syncd run`: syncs every tenant on its schedule until stopped; returns the exit code."""
    return await run_daemon(
        cfg, data_dir=args.data_dir, config_path=cfg.path, listen=args.listen, scrubber=scrubber
    )


async def run_daemon(
    cfg: config.Config,
    *,
    data_dir: Path | None,
    config_path: Path | None,
    listen: str | None = None,
    scrubber: logs.SecretScrubber | None = None,
) -> int:
    """Syncs every tenant on its schedule until stopped; returns the exit code.

    `listen` (from `--listen`) overrides `[daemon] listen`; `scrubber` is the log scrubber,
    told about the secrets of every reloaded config.
    """
    listen_text = listen or cfg.daemon.listen
    try:
        host, port = config.parse_listen(listen_text)
    except ValueError as exc:
        raise errors.ConfigError([f"--listen: {exc}"]) from None
    daemon = Daemon(
        cfg,
        config_path=config_path,
        scrubber=scrubber or logs.SecretScrubber(),
        listen_override=listen,
    )
    return await daemon.run(data_dir, host, port)
