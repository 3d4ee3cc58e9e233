"""One tenant's sync, start to finish: the single code path of `syncd sync` and `syncd run`.

1. Take the tenant's advisory lock (another process syncing it: skip as busy).
2. Close runs a dead process left `running`; record this run as `running`.
3. Stream pages from VSPC into a temporary staging table with COPY.
4. Complete snapshot: one transaction applies adds and removals and finishes the run
   (`succeeded`), unless the mass-delete guard withholds the removals (`partial`).
   Incomplete snapshot: adds only, removals withheld (`partial`); nothing fetched: `failed`.
5. Anything else (the tenant's error, a bound, the database, a bug) rolls back and records
   the run as `failed`; cancellation records it as interrupted and propagates.

`sync_tenant` returns a `SyncResult` whatever happens inside (cancellation aside), so one
tenant can never take down another tenant's run. Every message it stores or returns has its
control characters stripped, known secrets scrubbed and its length capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from syncd import claims, config, db, errors, logs, store, vspc
from syncd.models import RunStatus
from syncd.paging import Page, Pair, SnapshotOutcome

log = structlog.get_logger(__name__)

# Pairs buffered before one COPY: large enough that COPY's per-call cost vanishes, small
# enough that memory stays a few MB whatever the snapshot's size.
COPY_BATCH_PAIRS = 20_000
BUSY = "busy: another syncd process is syncing this tenant"
INTERRUPTED = "interrupted: syncd was stopped"


@dataclass(frozen=True)
class SyncResult:
    """The outcome of one tenant's run, as the CLI summary and the daemon's metrics see it."""

    tenant: str
    status: RunStatus
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

    @property
    def ok(self) -> bool:
        """Succeeded, or skipped because another process was syncing the tenant."""
        return self.status in (RunStatus.SUCCEEDED, RunStatus.SKIPPED)


class ProgressSink(Protocol):
    """Receives progress of a run (a rich progress bar, or nothing)."""

    def advance(self, tenant: str, pairs: int, total: int | None) -> None: ...


# --- decisions (pure) ----------------------------------------------------------------------


def mass_delete_verdict(
    *,
    removals: int,
    present_before: int,
    baseline: int,
    snapshot_empty: bool,
    settings: config.SyncSettings,
) -> str | None:
    """Why a complete snapshot's removals must be withheld, or None when they may go ahead.

    Removals are judged against the larger of the pairs stored now and `baseline`, the
    most pairs a complete run confirmed within `delete_baseline_window`: a server that
    shrinks the collection a little on every run cannot drain it run by run. They are
    withheld when they would leave fewer than (1 - max_delete_fraction) of that reference,
    unless the whole drop from it is within `mass_delete_floor`. An empty snapshot where
    pairs exist is always withheld: it is the classic sign of credentials that lost their
    scope, not of every job being deleted.
    """
    if removals == 0:
        return None
    if snapshot_empty:
        return f"the snapshot is empty but {present_before} pair(s) are stored"
    reference = max(baseline, present_before)
    kept = present_before - removals
    keep_at_least = (1 - settings.max_delete_fraction) * reference
    if reference - kept <= settings.mass_delete_floor or kept >= keep_at_least:
        return None
    window = f"{settings.delete_baseline_window_s / 86400:g} day(s)"
    return (
        f"the snapshot would remove {removals} of {present_before} stored pairs, leaving "
        f"{kept}: fewer than {1 - settings.max_delete_fraction:.0%} of {reference}, the most "
        f"pairs stored or confirmed in the last {window} "
        f"(max_delete_fraction {settings.max_delete_fraction:.0%})"
    )


@dataclass(frozen=True)
class _Failure:
    message: str
    database_failure: bool


def _describe_failure(exc: BaseException) -> _Failure:
    """What a run's exception means for the operator, in one line (not yet cleaned)."""
    chain = "; ".join(errors.cause_chain(exc))
    if isinstance(exc, errors.TenantError):
        return _Failure(chain, database_failure=False)
    if db.is_database_error(exc):
        return _Failure(f"database failure: {chain}", database_failure=True)
    return _Failure(f"internal error: {type(exc).__name__}: {chain}", database_failure=False)


# --- the run's lifecycle -------------------------------------------------------------------


class _RunFailed(Exception):
    """A run failed after its row existed; the row already says so."""

    def __init__(self, failure: _Failure, run_id: int, pages_fetched: int) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.run_id = run_id
        self.pages_fetched = pages_fetched


class _Stager:
    """Collects pages into COPY batches; counts what arrived."""

    def __init__(self, connection: AsyncConnection, tenant: str, progress: ProgressSink | None):
        self._connection = connection
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
            await store.copy_pairs(self._connection, self._buffer)
            self._buffer = []


@dataclass(frozen=True)
class _ActiveRun:
    run: store.Run
    connection: AsyncConnection
    stager: _Stager


async def _record_failure(
    engine: AsyncEngine, connection: AsyncConnection, run_id: int, error: str, pages: int
) -> None:
    """Records the run as failed: on its own connection if that still works, else a new one."""
    try:
        await connection.rollback()
        await store.fail_run(connection, run_id, error, pages)
        await connection.commit()
        return
    except Exception:  # noqa: S110 - the connection is gone; try a fresh one below
        pass
    try:
        async with engine.begin() as fresh:
            await store.fail_run(fresh, run_id, error, pages)
    except Exception as exc:
        # The next run of this tenant closes it as abandoned: nothing is lost.
        log.warning("could not record the run as failed", run_id=run_id, error=str(exc))


@contextlib.asynccontextmanager
async def _run_lifecycle(
    engine: AsyncEngine,
    tenant: config.Tenant,
    clean: Callable[[str], str],
    progress: ProgressSink | None,
    replica: str,
) -> AsyncIterator[_ActiveRun | None]:
    """Lock, start, record failure, release: one run of `tenant` on one connection.

    Yields None when another process holds the tenant. An exception in the block is
    recorded in the run's row and re-raised as `_RunFailed`; cancellation is recorded as
    interrupted and propagates. Errors before the run exists propagate as they are.
    """
    with db.database_errors("cannot reach the database"):
        connection = await engine.connect()
    try:
        with db.database_errors("cannot take the tenant's lock"):
            tenant_id = await store.ensure_tenant(connection, tenant.name)
            locked = await store.try_lock(connection, tenant_id)
            await connection.commit()
        if not locked:
            yield None
            return
        try:
            with db.database_errors("cannot record the run"):
                abandoned = await store.close_abandoned_runs(connection, tenant_id)
                run = await store.start_run(connection, tenant_id, tenant.name, replica)
                await connection.commit()
            if abandoned:
                log.warning(
                    "closed runs left running by a stopped process",
                    tenant=tenant.name,
                    count=abandoned,
                )
            stager = _Stager(connection, tenant.name, progress)
            try:
                with structlog.contextvars.bound_contextvars(tenant=tenant.name, run_id=run.id):
                    yield _ActiveRun(run, connection, stager)
            except asyncio.CancelledError:
                await _record_failure(engine, connection, run.id, INTERRUPTED, stager.pages)
                log.warning("sync interrupted; nothing applied", tenant=tenant.name)
                raise
            except Exception as exc:
                failure = _describe_failure(exc)
                if not isinstance(exc, errors.TenantError) and not failure.database_failure:
                    log.exception("sync crashed", tenant=tenant.name, run_id=run.id)
                failure = _Failure(clean(failure.message), failure.database_failure)
                await _record_failure(engine, connection, run.id, failure.message, stager.pages)
                raise _RunFailed(failure, run.id, stager.pages) from exc
        finally:
            with contextlib.suppress(Exception):
                await connection.rollback()
                await store.clear_staging(connection)
                await store.unlock(connection, tenant_id)
                await connection.commit()
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


# --- applying a snapshot -------------------------------------------------------------------


@dataclass(frozen=True)
class _Applied:
    status: RunStatus
    pairs_seen: int
    added: int
    removed: int
    current_pairs: int
    error: str | None


async def _apply_guarded(
    active: _ActiveRun, settings: config.SyncSettings
) -> tuple[store.ApplyResult, str | None]:
    """Applies a complete snapshot under the mass-delete guard; (result, verdict).

    Applies first and judges after, inside a savepoint: in the usual case (the guard lets
    the removals through) the diff runs once, with no counting pass before it. When the
    guard trips, the savepoint is rolled back and the snapshot applied again, adds only.
    """
    connection, run = active.connection, active.run
    savepoint = await connection.begin_nested()
    applied = await store.apply_snapshot(connection, run, remove_absent=True)
    verdict = None
    if applied.removed:
        verdict = mass_delete_verdict(
            removals=applied.removed,
            present_before=applied.present_before,
            baseline=await store.delete_baseline(
                connection, run, settings.delete_baseline_window_s
            ),
            snapshot_empty=active.stager.pairs == 0,
            settings=settings,
        )
    if verdict is None:
        await savepoint.commit()
        return applied, None
    await savepoint.rollback()
    return await store.apply_snapshot(connection, run, remove_absent=False), verdict


async def _apply(
    active: _ActiveRun,
    outcome: SnapshotOutcome,
    settings: config.SyncSettings,
    allow_mass_delete: bool,
) -> _Applied:
    """Applies the staged snapshot and finishes the run, in one transaction (uncommitted)."""
    connection, run = active.connection, active.run
    if not outcome.complete:
        applied = await store.apply_snapshot(connection, run, remove_absent=False)
        error: str | None = "incomplete snapshot, removals withheld: " + "; ".join(outcome.problems)
        status = RunStatus.PARTIAL
    elif allow_mass_delete:
        applied, error = await store.apply_snapshot(connection, run, remove_absent=True), None
        status = RunStatus.SUCCEEDED
    else:
        applied, verdict = await _apply_guarded(active, settings)
        status = RunStatus.SUCCEEDED if verdict is None else RunStatus.PARTIAL
        error = None
        if verdict is not None:
            error = (
                f"mass-delete guard: {verdict}; added pairs were stored, removals withheld. "
                f"If the removals are real, run: syncd sync --tenant {run.tenant} "
                "--allow-mass-delete"
            )
    # Succeeded: the open pairs now are exactly the snapshot's distinct pairs.
    seen = (
        applied.present_after
        if status is RunStatus.SUCCEEDED
        else await store.distinct_staged(connection)
    )
    return _Applied(status, seen, applied.added, applied.removed, applied.present_after, error)


# --- the one entry point -------------------------------------------------------------------


async def sync_tenant(
    tenant: config.Tenant,
    engine: AsyncEngine,
    *,
    allow_mass_delete: bool = False,
    observer: vspc.RequestObserver | None = None,
    progress: ProgressSink | None = None,
    scrubber: logs.SecretScrubber | None = None,
    replica: str | None = None,
) -> SyncResult:
    """Syncs one tenant's snapshot into the database and records the run.

    Always returns a `SyncResult` (cancellation aside, which is recorded and re-raised):
    the tenant's errors, a bound that trips, `[sync] run_timeout`, the database and bugs
    all become a `failed` (or `partial`) result, recorded in the run's row once it exists.
    `scrubber` (the process's log scrubber) learns the tokens obtained during the run; the
    tenant's own secrets are scrubbed from every message whether or not it is given.
    `replica` is recorded on the run (default: `config.default_replica_name()`).
    """
    started = time.monotonic()
    secrets = scrubber if scrubber is not None else logs.SecretScrubber()
    secrets.register(tenant.secrets())

    def clean(text: str) -> str:
        return errors.clean_text(secrets.scrub(text))

    def failed(failure: _Failure, run_id: int | None = None, pages: int = 0) -> SyncResult:
        log.error("sync failed", tenant=tenant.name, run_id=run_id, error=failure.message)
        return SyncResult(
            tenant=tenant.name,
            status=RunStatus.FAILED,
            run_id=run_id,
            pages_fetched=pages,
            duration_s=time.monotonic() - started,
            error=failure.message,
            database_failure=failure.database_failure,
        )

    try:
        replica = replica or config.default_replica_name()
        async with _run_lifecycle(engine, tenant, clean, progress, replica) as active:
            if active is None:
                log.info(
                    "tenant busy: another syncd process is syncing it; skipped", tenant=tenant.name
                )
                return SyncResult(tenant=tenant.name, status=RunStatus.SKIPPED, error=BUSY)
            applied = await _fetch_and_apply(
                active, tenant, observer, secrets.register, clean, allow_mass_delete
            )
    except _RunFailed as exc:
        return failed(exc.failure, exc.run_id, exc.pages_fetched)
    except Exception as exc:  # before the run existed: the database, most likely
        failure = _describe_failure(exc)
        if not failure.database_failure:
            log.exception("sync crashed before its run was recorded", tenant=tenant.name)
        return failed(_Failure(clean(failure.message), failure.database_failure))
    result = SyncResult(
        tenant=tenant.name,
        status=applied.status,
        run_id=active.run.id,
        pages_fetched=active.stager.pages,
        pairs_seen=applied.pairs_seen,
        added=applied.added,
        removed=applied.removed,
        duration_s=time.monotonic() - started,
        error=applied.error,
        current_pairs=applied.current_pairs,
    )
    log.info(
        "sync finished",
        tenant=tenant.name,
        run_id=result.run_id,
        status=str(result.status),
        pairs=result.current_pairs,
        added=result.added,
        removed=result.removed,
        pages=result.pages_fetched,
        seconds=round(result.duration_s, 3),
        error=result.error,
    )
    return result


async def _fetch_and_apply(
    active: _ActiveRun,
    tenant: config.Tenant,
    observer: vspc.RequestObserver | None,
    on_secret: vspc.SecretSink,
    clean: Callable[[str], str],
    allow_mass_delete: bool,
) -> _Applied:
    """Fetches the snapshot into staging and applies it, all within `run_timeout`; commits.

    The run's message (server text among it) passes through `clean` before it is stored.
    """
    settings = tenant.settings
    deadline = asyncio.timeout(settings.run_timeout_s)
    try:
        async with deadline:
            await store.prepare_staging(active.connection)
            async with vspc.open_client(tenant, observer=observer, on_secret=on_secret) as client:
                outcome = await client.fetch_snapshot(active.stager.on_page)
            await active.stager.flush()
            applied = await _apply(active, outcome, settings, allow_mass_delete)
            if applied.error is not None:
                applied = dataclasses.replace(applied, error=clean(applied.error))
            await store.finish_run(
                active.connection,
                active.run,
                store.RunTotals(
                    status=applied.status,
                    pages_fetched=active.stager.pages,
                    pairs_seen=applied.pairs_seen,
                    added=applied.added,
                    removed=applied.removed,
                    error=applied.error,
                    current_pairs=applied.current_pairs,
                ),
                reset_baseline=allow_mass_delete and applied.status is RunStatus.SUCCEEDED,
            )
            await active.connection.commit()
    except TimeoutError as exc:
        if not deadline.expired():
            raise
        raise errors.BoundExceeded(
            f"tenant {tenant.name!r}: the run took longer than run_timeout "
            f"({settings.run_timeout_s:g}s) and was stopped, nothing applied; if the tenant "
            "is that big or that slow, raise [sync] run_timeout",
            key="run_timeout",
        ) from exc
    return applied


# --- many tenants --------------------------------------------------------------------------

T = TypeVar("T")
R = TypeVar("R")


async def run_each(
    items: Sequence[T],
    run_one: Callable[[T], Awaitable[R]],
    *,
    max_concurrent: int,
    on_crash: Callable[[T, Exception], R],
) -> list[R]:
    """`run_one` for every item, at most `max_concurrent` at once, results in input order.

    The one concurrency policy of `syncd sync`, `syncd check` and the demo. An exception
    from one item becomes `on_crash(item, exc)`: whatever fails, every other item runs.
    """
    limit = asyncio.Semaphore(max_concurrent)

    async def one(item: T) -> R:
        async with limit:
            try:
                return await run_one(item)
            except Exception as exc:
                log.exception("a tenant's task crashed")
                return on_crash(item, exc)

    return list(await asyncio.gather(*(one(item) for item in items)))


async def sync_now(
    tenant: config.Tenant,
    engine: AsyncEngine,
    *,
    replica: claims.Replica,
    allow_mass_delete: bool = False,
    progress: ProgressSink | None = None,
    scrubber: logs.SecretScrubber | None = None,
) -> SyncResult:
    """`sync_tenant` now, whatever the tenant's due time (`syncd sync`, a manual override),
    unless another process holds its claim (skipped as busy); then moves its due time, as
    a daemon's run would. Always returns a result, like `sync_tenant`."""
    try:
        look = await claims.claim(
            engine, tenant, replica.name, regardless_of_due=True, reclaim_own=False
        )
    except errors.DatabaseError as exc:
        secrets = scrubber if scrubber is not None else logs.SecretScrubber()
        message = errors.clean_text(secrets.scrub(f"database failure: {exc}"))
        log.error("sync failed", tenant=tenant.name, error=message)
        return SyncResult(tenant.name, RunStatus.FAILED, error=message, database_failure=True)
    if look.outcome is not claims.Outcome.WON:
        log.info(
            "tenant busy: another syncd process is syncing it; skipped",
            tenant=tenant.name,
            claimed_by=look.claimed_by,
        )
        return SyncResult(tenant=tenant.name, status=RunStatus.SKIPPED, error=BUSY)

    async def release(how: claims.Ended) -> None:
        try:
            await claims.release(
                engine, look, replica, tenant.settings, how, ended_monotonic_s=time.monotonic()
            )
        except errors.DatabaseError as exc:
            # The claim expires after run_timeout; the daemons run the tenant then.
            log.warning("cannot release the tenant's claim", tenant=tenant.name, error=str(exc))

    try:
        result = await sync_tenant(
            tenant,
            engine,
            allow_mass_delete=allow_mass_delete,
            progress=progress,
            scrubber=scrubber,
            replica=replica.name,
        )
    except asyncio.CancelledError:
        await release(claims.Ended.NOT_RUN)  # still due: a daemon runs it
        raise
    await release(claims.ended(result.status, database_failure=result.database_failure))
    return result


async def sync_tenants(
    tenants: Sequence[config.Tenant],
    engine: AsyncEngine,
    *,
    max_concurrent_tenants: int,
    allow_mass_delete: bool = False,
    progress: ProgressSink | None = None,
    scrubber: logs.SecretScrubber | None = None,
    replica: claims.Replica | None = None,
) -> list[SyncResult]:
    """Syncs `tenants` concurrently, at most `max_concurrent_tenants` at once.

    With `replica`, through `sync_now`: claimed, and their due times moved (`syncd sync`);
    without, plainly (the demo and the benchmarks own their database).
    """

    async def one(tenant: config.Tenant) -> SyncResult:
        if replica is not None:
            return await sync_now(
                tenant,
                engine,
                replica=replica,
                allow_mass_delete=allow_mass_delete,
                progress=progress,
                scrubber=scrubber,
            )
        return await sync_tenant(
            tenant,
            engine,
            allow_mass_delete=allow_mass_delete,
            progress=progress,
            scrubber=scrubber,
        )

    def crashed(tenant: config.Tenant, exc: Exception) -> SyncResult:
        message = errors.clean_text(f"internal error: {type(exc).__name__}: {exc}")
        return SyncResult(tenant=tenant.name, status=RunStatus.FAILED, error=message)

    return await run_each(tenants, one, max_concurrent=max_concurrent_tenants, on_crash=crashed)
