"""One tenant's sync, start to finish: the single code path of `syncd sync` and `syncd run`.

1. Take the tenant's advisory lock (another process syncing it: skip as busy).
2. Close runs a dead process left `running`; record this run as `running`.
3. Stream pages from VSPC into a temporary staging table with COPY.
4. Complete snapshot: one transaction applies adds and removals and finishes the run
   (`succeeded`), unless the mass-delete guard withholds the removals (`partial`).
   Incomplete snapshot: adds only, removals withheld (`partial`); nothing fetched: `failed`.
5. Cancellation or a database failure rolls back and records the run as `failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from syncd import config, errors, store, vspc
from syncd.paging import Page, Pair, SnapshotOutcome

log = structlog.get_logger(__name__)

Status = Literal["succeeded", "partial", "failed", "skipped"]

# Pairs buffered before one COPY: large enough that COPY's per-call cost vanishes, small
# enough that memory stays a few MB whatever the snapshot's size.
COPY_BATCH_PAIRS = 20_000


@dataclass(frozen=True)
class SyncResult:
    """The outcome of one tenant's run, as the CLI summary and the daemon's metrics see it."""

    tenant: str
    status: Status
    run_id: int | None = None
    pages_fetched: int = 0
    pairs_seen: int = 0
    added: int = 0
    removed: int = 0
    duration_s: float = 0.0
    error: str | None = None
    current_pairs: int | None = None
    # The database failed, not the tenant: a scheduler retries soon rather than backing off.
    database_failure: bool = False


class ProgressSink(Protocol):
    """Receives progress of a run (a rich progress bar, or nothing)."""

    def advance(self, tenant: str, pairs: int, total: int | None) -> None: ...


ClientFactory = Callable[..., contextlib.AbstractAsyncContextManager[vspc.VspcClient]]


def mass_delete_verdict(
    *, removals: int, current: int, snapshot_empty: bool, settings: config.SyncSettings
) -> str | None:
    """Why a complete snapshot's removals must be withheld, or None when they may go ahead.

    An empty snapshot where pairs existed is always held back: it is the classic sign of
    credentials that lost their scope, not of every job being deleted.
    """
    if removals == 0:
        return None
    if snapshot_empty:
        return f"the snapshot is empty but {current} pair(s) are stored"
    if removals > settings.mass_delete_floor and removals > settings.max_delete_fraction * current:
        return (
            f"the snapshot would remove {removals} of {current} pairs "
            f"({removals / current:.0%} > max_delete_fraction {settings.max_delete_fraction:.0%})"
        )
    return None


class _Stager:
    """Collects pages into COPY batches; counts what arrived."""

    def __init__(self, run_store: store.RunStore, tenant: str, progress: ProgressSink | None):
        self._store = run_store
        self._tenant = tenant
        self._progress = progress
        self._buffer: list[Pair] = []
        self.pages = 0
        self.pairs = 0

    async def on_page(self, page: Page) -> None:
        self.pages += 1
        self.pairs += len(page.pairs)
        self._buffer.extend(page.pairs)
        if len(self._buffer) >= COPY_BATCH_PAIRS:
            await self.flush()
        if self._progress is not None:
            self._progress.advance(self._tenant, len(page.pairs), page.total)

    async def flush(self) -> None:
        if self._buffer:
            await self._store.copy_pairs(self._buffer)
            self._buffer = []


@contextlib.contextmanager
def _database_errors(action: str) -> Iterator[None]:
    """Translates the driver's errors into `errors.DatabaseError` ("try again later")."""
    try:
        yield
    except (OSError, sa.exc.DBAPIError, sa.exc.InterfaceError) as exc:
        raise errors.DatabaseError(f"{action}: {'; '.join(errors.cause_chain(exc))}") from exc


def _is_database_failure(exc: BaseException) -> bool:
    return isinstance(
        exc, sa.exc.DBAPIError | sa.exc.InterfaceError | OSError | errors.DatabaseError
    )


async def _record_failure(
    engine: AsyncEngine, connection: AsyncConnection, run_id: int, error: str, pages: int
) -> None:
    """Records the run as failed: on its own connection if that still works, else a new one."""
    try:
        await connection.rollback()
        await store.fail_run(connection, run_id, error, pages)
        return
    except Exception:  # noqa: S110 - the connection is gone; try a fresh one below
        pass
    try:
        async with engine.connect() as fresh:
            await store.fail_run(fresh, run_id, error, pages)
    except Exception as exc:
        # The next run of this tenant closes it as abandoned: nothing is lost.
        log.warning("could not record the run as failed", run_id=run_id, error=str(exc))


@contextlib.asynccontextmanager
async def _locked_tenant(
    engine: AsyncEngine, tenant_name: str
) -> AsyncIterator[tuple[AsyncConnection, store.RunStore] | None]:
    """A connection holding the tenant's advisory lock, or None when another process has it."""
    with _database_errors("cannot reach the database"):
        connection = await engine.connect()
    try:
        run_store = store.RunStore(connection, tenant_name)
        with _database_errors("cannot take the tenant's lock"):
            await run_store.ensure_tenant()
            locked = await run_store.try_lock()
        if not locked:
            yield None
            return
        try:
            yield connection, run_store
        finally:
            with contextlib.suppress(Exception):
                await connection.rollback()
                await run_store.clear_staging()
                await run_store.unlock()
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


async def _apply_guarded(
    run_store: store.RunStore, stager: _Stager, settings: config.SyncSettings
) -> tuple[store.ApplyResult, str | None]:
    """Applies a complete snapshot under the mass-delete guard; (result, verdict).

    Applies first and judges after, inside a savepoint: in the usual case (the guard lets
    the removals through) the diff runs once, with no counting pass before it. When the
    guard trips, the savepoint is rolled back and the snapshot applied again, adds only.
    """
    savepoint = await run_store.connection.begin_nested()
    applied = await run_store.apply(remove_absent=True)
    verdict = mass_delete_verdict(
        removals=applied.removed,
        current=applied.present_before,
        snapshot_empty=stager.pairs == 0,
        settings=settings,
    )
    if verdict is None:
        await savepoint.commit()
        return applied, None
    await savepoint.rollback()
    return await run_store.apply(remove_absent=False), verdict


async def _apply_snapshot(
    run_store: store.RunStore,
    outcome: SnapshotOutcome,
    stager: _Stager,
    settings: config.SyncSettings,
    allow_mass_delete: bool,
) -> tuple[Status, int, int, int, str | None, int]:
    """Applies the staged snapshot; (status, seen, added, removed, error, current pairs)."""
    if outcome.complete:
        if allow_mass_delete:
            applied, verdict = await run_store.apply(remove_absent=True), None
        else:
            applied, verdict = await _apply_guarded(run_store, stager, settings)
        if verdict is None:
            status: Status = "succeeded"
            error = None
            # The open pairs now are exactly the snapshot's distinct pairs.
            seen = applied.present_before + applied.added - applied.removed
        else:
            status = "partial"
            error = (
                f"mass-delete guard: {verdict}; added pairs were stored, removals withheld. "
                f"If the removals are real, run: syncd sync --tenant {run_store.tenant_name} "
                "--allow-mass-delete"
            )
            seen = await run_store.distinct_staged()
    else:
        applied = await run_store.apply(remove_absent=False)
        status = "partial"
        error = "incomplete snapshot, removals withheld: " + "; ".join(outcome.problems)
        seen = await run_store.distinct_staged()
    added, removed = applied.added, applied.removed
    current_after = applied.present_before + added - removed
    await run_store.finish_run(
        status=status,
        pages_fetched=stager.pages,
        pairs_seen=seen,
        added=added,
        removed=removed,
        error=error,
        confirmed=status == "succeeded",
        current_pairs=current_after,
    )
    return status, seen, added, removed, error, current_after


async def sync_tenant(
    tenant: config.Tenant,
    engine: AsyncEngine,
    *,
    allow_mass_delete: bool = False,
    observer: vspc.RequestObserver | None = None,
    progress: ProgressSink | None = None,
    client_factory: ClientFactory = vspc.open_client,
) -> SyncResult:
    """Syncs one tenant's snapshot into the database and records the run.

    Never raises for the tenant's own failures (they become a `failed`/`partial` result);
    raises `errors.DatabaseError` only when the database cannot be reached at all, and
    re-raises cancellation after recording the run as interrupted.
    """
    started = time.monotonic()
    async with _locked_tenant(engine, tenant.name) as locked:
        if locked is None:
            log.info(
                "tenant busy: another syncd process is syncing it; skipped", tenant=tenant.name
            )
            return SyncResult(
                tenant=tenant.name,
                status="skipped",
                error="busy: another syncd process is syncing this tenant",
            )
        connection, run_store = locked
        with _database_errors("cannot record the run"):
            abandoned = await run_store.close_abandoned_runs()
            run_id = await run_store.start_run()
        if abandoned:
            log.warning(
                "closed runs left running by a stopped process",
                tenant=tenant.name,
                count=abandoned,
            )
        stager = _Stager(run_store, tenant.name, progress)

        async def failed(message: str, *, database_failure: bool) -> SyncResult:
            await _record_failure(engine, connection, run_id, message, stager.pages)
            log.error("sync failed", error=message)
            return SyncResult(
                tenant=tenant.name,
                status="failed",
                run_id=run_id,
                pages_fetched=stager.pages,
                duration_s=time.monotonic() - started,
                error=message,
                database_failure=database_failure,
            )

        with structlog.contextvars.bound_contextvars(tenant=tenant.name, run_id=run_id):
            try:
                await run_store.create_staging()
                async with client_factory(tenant, observer=observer) as client:
                    outcome = await client.fetch_snapshot(stager.on_page)
                await stager.flush()
                status, seen, added, removed, error, current = await _apply_snapshot(
                    run_store, outcome, stager, tenant.settings, allow_mass_delete
                )
                await connection.commit()
            except errors.TenantError as exc:
                return await failed("; ".join(errors.cause_chain(exc)), database_failure=False)
            except asyncio.CancelledError:
                await _record_failure(
                    engine, connection, run_id, "interrupted: syncd was stopped", stager.pages
                )
                log.warning("sync interrupted; nothing applied")
                raise
            except Exception as exc:
                if not _is_database_failure(exc):
                    await _record_failure(
                        engine, connection, run_id, f"internal error: {exc!r}", stager.pages
                    )
                    raise
                message = "database failure: " + "; ".join(errors.cause_chain(exc))
                return await failed(message, database_failure=True)
            result = SyncResult(
                tenant=tenant.name,
                status=status,
                run_id=run_id,
                pages_fetched=stager.pages,
                pairs_seen=seen,
                added=added,
                removed=removed,
                duration_s=time.monotonic() - started,
                error=error,
                current_pairs=current,
            )
            log.info(
                "sync finished",
                status=status,
                pairs=current,
                added=added,
                removed=removed,
                pages=stager.pages,
                seconds=round(result.duration_s, 3),
                error=error,
            )
            return result
