"""One tenant's sync, start to finish: the single code path of `syncd sync` and `syncd run`.

1. Take the tenant's advisory lock (another process syncing it: skip as busy).
2. Close runs a dead process left `running`; record this run as `running`.
3. Fetch every configured collection concurrently (one bound of `max_concurrent_pages` for
   the whole tenant) and stream their pages into temporary staging tables with COPY.
4. One transaction applies each collection and finishes the run. Per collection: complete
   snapshot, adds and removals (`succeeded`) unless the mass-delete guard withholds the
   removals (`partial`); incomplete, adds and changes only (`partial`); failed, nothing
   (`failed`); 404 on its first page, nothing and no failure (`unavailable`). The run
   succeeds when every available collection did, fails when all of them failed, and is
   `partial` otherwise.
5. Anything else (a bound of the whole run, the database, a bug) rolls back and records the
   run as `failed`; cancellation records it as interrupted and propagates.

`sync_tenant` returns a `SyncResult` whatever happens inside (cancellation aside), so one
tenant can never take down another tenant's run. Every message it stores or returns has its
control characters stripped, known secrets scrubbed and its length capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from syncd import claims, collections, config, db, errors, logs, store, vspc
from syncd.collections import Collection, Kind
from syncd.collections import Status as CollectionStatus
from syncd.paging import Page, PairBlock, Record, SnapshotOutcome
from syncd.status import RunStatus

log = structlog.get_logger(__name__)

# Items buffered before one COPY: large enough that COPY's per-call cost vanishes, small
# enough that memory stays a few MB whatever the snapshot's size (catalog records are
# larger than pairs).
COPY_BATCH_PAIRS = 20_000
COPY_BATCH_RECORDS = 5_000
# Bytes of one collection's pages held back while its snapshot may equal the confirmed one
# (see `_Stager`): 8 MiB is 170,000 pairs (48 bytes each), or some thousands of catalog
# items; per collection of each tenant running at once.
HOLD_MAX_BYTES = 8 * 1024 * 1024
BUSY = "busy: another syncd process is syncing this tenant"
INTERRUPTED = "interrupted: syncd was stopped"


@dataclass(frozen=True)
class CollectionResult:
    """How one collection of one run ended (an entry of `sync_runs.collections`)."""

    status: CollectionStatus
    pages: int = 0
    seen: int = 0
    added: int = 0
    removed: int = 0
    changed: int = 0  # catalog items given a new version
    error: str | None = None
    # Items stored after the run; None when nothing was applied.
    current: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The form stored in `runs.collections` and shown by `/status`."""
        return {
            "status": str(self.status),
            "pages": self.pages,
            "seen": self.seen,
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "error": self.error,
        }


@dataclass(frozen=True)
class SyncResult:
    """The outcome of one tenant's run, as the CLI summary and the daemon's metrics see it.

    `pairs_seen`, `added`, `removed` and `current_pairs` count the links of both copy modes;
    `collections` has each collection's own outcome.
    """

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
    collections: Mapping[str, CollectionResult] = field(default_factory=dict)

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
    noun: str = "pairs",
) -> str | None:
    """Why a complete snapshot's removals must be withheld, or None when they may go ahead.

    Judged per collection (`noun` names its items). Removals are judged against the larger
    of the items stored now and `baseline`, the most items a complete snapshot of the
    collection confirmed within `delete_baseline_window`: a server that
    shrinks the collection a little on every run cannot drain it run by run. They are
    withheld when they would leave fewer than (1 - max_delete_fraction) of that reference,
    unless the whole drop from it is within `mass_delete_floor`. An empty snapshot where
    pairs exist is always withheld: it is the classic sign of credentials that lost their
    scope, not of every job being deleted.
    """
    if removals == 0:
        return None
    if snapshot_empty:
        return f"the snapshot is empty but {present_before} {noun} are stored"
    reference = max(baseline, present_before)
    kept = present_before - removals
    keep_at_least = (1 - settings.max_delete_fraction) * reference
    if reference - kept <= settings.mass_delete_floor or kept >= keep_at_least:
        return None
    window = f"{settings.delete_baseline_window_s / 86400:g} day(s)"
    return (
        f"the snapshot would remove {removals} of {present_before} stored {noun}, leaving "
        f"{kept}: fewer than {1 - settings.max_delete_fraction:.0%} of {reference}, the most "
        f"{noun} stored or confirmed in the last {window} "
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


@dataclass
class _Staging:
    """One collection's pages on their way to staging."""

    collection: Collection
    confirmed: store.ConfirmedSnapshot | None
    # Pages held back while every one so far matches the confirmed snapshot: if the whole
    # snapshot does, none is ever copied.
    holding: bool
    held: list[Page] = field(default_factory=list)
    held_bytes: int = 0
    blocks: list[PairBlock] = field(default_factory=list)
    block_items: int = 0
    records: list[Record] = field(default_factory=list)
    pages: int = 0
    items: int = 0
    total: int = 0


class _Stager:
    """Collects each collection's pages into COPY batches; counts what arrived.

    While a collection's pages all match its confirmed snapshot (`store.ConfirmedSnapshot`,
    page digests compared as they arrive), they are held in memory, at most
    `HOLD_MAX_BYTES`: a snapshot equal to the confirmed one is then never copied nor
    diffed. The first page that differs (or the bound) sends what was held to staging and
    the rest streams as it arrives.

    The collections of a run arrive concurrently on one connection: a lock keeps their
    COPYs one at a time (a connection runs one statement at once).
    """

    def __init__(
        self,
        connection: AsyncConnection,
        tenant: str,
        progress: ProgressSink | None,
        confirmed: Mapping[str, store.ConfirmedSnapshot],
    ):
        self._connection = connection
        self._tenant = tenant
        self._progress = progress
        self._confirmed = confirmed
        self._lock = asyncio.Lock()
        self._states: dict[str, _Staging] = {}
        self.pages = 0
        # Staging tables were readied this run.
        self.staged = False
        # Collections whose snapshot equals their confirmed one (set by `finish`).
        self.unchanged: dict[str, store.ConfirmedSnapshot] = {}

    def pages_of(self, name: str) -> int:
        """Pages of collection `name` that arrived."""
        state = self._states.get(name)
        return 0 if state is None else state.pages

    def items_of(self, name: str) -> int:
        """Items (with the pages' shared ones) of collection `name` that arrived."""
        state = self._states.get(name)
        return 0 if state is None else state.items

    def sink(self, collection: Collection) -> Callable[[Page], Awaitable[None]]:
        """The `on_page` of `collection`'s snapshot."""
        confirmed = self._confirmed.get(collection.name)
        state = _Staging(collection, confirmed, holding=confirmed is not None)
        self._states[collection.name] = state

        async def on_page(page: Page) -> None:
            self.pages += 1
            state.pages += 1
            state.items += page.count
            if self._progress is not None and collection.kind is Kind.LINKS:
                state.total = page.total
                total = sum(s.total for s in self._states.values())
                self._progress.advance(self._tenant, page.count, total)
            if state.holding:
                assert state.confirmed is not None
                size = page.size_bytes()
                if state.held_bytes + size <= HOLD_MAX_BYTES and state.confirmed.key.matches(page):
                    state.held.append(page)
                    state.held_bytes += size
                    return
                self._release(state)
            self._buffer(state, page)
            if state.block_items >= COPY_BATCH_PAIRS or len(state.records) >= COPY_BATCH_RECORDS:
                await self._flush(state)

        return on_page

    def _release(self, state: _Staging) -> None:
        """Stops holding: what was held joins the COPY buffer."""
        state.holding = False
        for held in state.held:
            self._buffer(state, held)
        state.held, state.held_bytes = [], 0

    @staticmethod
    def _buffer(state: _Staging, page: Page) -> None:
        if page.block.count:
            state.blocks.append(page.block)
            state.block_items += page.block.count
        state.records.extend(page.records)

    async def _flush(self, state: _Staging) -> None:
        blocks, records = state.blocks, state.records
        state.blocks, state.block_items, state.records = [], 0, []
        if not blocks and not records:
            return
        async with self._lock:
            await self._ready_staging()
            if state.collection.copy_mode is not None:
                await store.copy_pairs(self._connection, state.collection.copy_mode, blocks)
            else:
                await store.copy_records(self._connection, state.collection.name, records)

    async def _ready_staging(self) -> None:
        if not self.staged:
            await store.prepare_staging(self._connection)
            self.staged = True

    async def finish(self, fetched: Sequence[_Fetched]) -> None:
        """Stages what each fetched collection still buffers, except for those whose
        snapshot equals their confirmed one (`unchanged`: nothing of them needs applying);
        readies the staging tables if anything is to be applied."""
        for item in fetched:
            state = self._states.get(item.collection.name)
            if state is None or item.outcome is None:
                continue  # nothing to apply: what arrived stays unstaged
            key = item.outcome.key()
            if key is not None and state.confirmed is not None and key == state.confirmed.key:
                self.unchanged[item.collection.name] = state.confirmed
                state.held, state.blocks, state.records = [], [], []
                continue
            self._release(state)
            await self._flush(state)
            await self._ready_staging()


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


async def _invalidate(connection: AsyncConnection) -> None:
    """Ends the connection's session (and so any advisory lock it holds) instead of
    returning it to the pool; shielded, so a cancellation cannot skip it."""
    with contextlib.suppress(Exception):
        await asyncio.shield(connection.invalidate())


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
        try:
            with db.database_errors("cannot take the tenant's lock"):
                tenant_id, locked = await store.lock_tenant(connection, tenant.name)
        except BaseException:
            # The lock may have been taken before the answer was lost: end the session.
            await _invalidate(connection)
            raise
        if not locked:
            yield None
            return
        try:
            with db.database_errors("cannot record the run"):
                run = await store.start_run(connection, tenant_id, tenant.name, replica)
                await connection.commit()
            if run.abandoned:
                log.warning(
                    "closed runs left running by a stopped process",
                    tenant=tenant.name,
                    count=run.abandoned,
                )
            stager = _Stager(connection, tenant.name, progress, run.confirmed)
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
            try:
                await connection.rollback()  # staging empties itself at the transaction's end
                await store.unlock(connection, tenant_id)
            except Exception:
                # Back in the pool, the connection would keep the tenant locked: end its
                # session instead, which releases the lock.
                await _invalidate(connection)
            except BaseException:  # cancelled while cleaning up: the same, then propagate
                await _invalidate(connection)
                raise
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


# --- applying a snapshot -------------------------------------------------------------------


@dataclass(frozen=True)
class _Fetched:
    """What fetching one collection gave: a snapshot outcome, or why there is none."""

    collection: Collection
    outcome: SnapshotOutcome | None = None
    error: str | None = None
    unavailable: bool = False


@dataclass(frozen=True)
class _Applied:
    status: RunStatus
    pairs_seen: int
    added: int
    removed: int
    current_pairs: int | None
    error: str | None
    collections: dict[str, CollectionResult]
    confirmed: bool
    unavailable: tuple[str, ...]


def _collection_result(
    active: _ActiveRun,
    collection: Collection,
    outcome: SnapshotOutcome,
    applied: store.ApplyResult,
    *,
    removed_absent: bool,
) -> CollectionResult:
    """A collection's outcome from what its diff did (`removed_absent`: with removals)."""
    present_after = applied.present_before + applied.added - applied.removed
    if not outcome.complete:
        status = CollectionStatus.PARTIAL
        error: str | None = "incomplete snapshot, removals withheld: " + "; ".join(outcome.problems)
    else:
        status = CollectionStatus.SUCCEEDED if removed_absent else CollectionStatus.PARTIAL
        error = None
    return CollectionResult(
        status=status,
        pages=active.stager.pages_of(collection.name),
        seen=present_after,  # the snapshot's distinct items, when it succeeded
        added=applied.added,
        removed=applied.removed,
        changed=applied.changed,
        error=error,
        current=present_after,
    )


async def _apply_all(
    active: _ActiveRun, fetched: Sequence[_Fetched], withheld: Mapping[str, str]
) -> dict[str, tuple[CollectionResult, store.ApplyResult | None]]:
    """Applies every collection that was fetched (each links collection on its own, the
    catalog collections together), removals withheld for incomplete snapshots and those in
    `withheld` (name: the mass-delete guard's verdict). Results in `fetched`'s order."""
    connection, run = active.connection, active.run
    done: dict[str, tuple[CollectionResult, store.ApplyResult | None]] = {}
    catalog: list[tuple[Collection, SnapshotOutcome]] = []
    removable = {
        item.collection.name
        for item in fetched
        if item.outcome is not None
        and item.outcome.complete
        and item.collection.name not in withheld
    }
    for item in fetched:
        collection = item.collection
        if item.outcome is None:
            missing = CollectionStatus.UNAVAILABLE if item.unavailable else CollectionStatus.FAILED
            pages = active.stager.pages_of(collection.name)
            done[collection.name] = (CollectionResult(missing, pages, error=item.error), None)
        elif (confirmed := active.stager.unchanged.get(collection.name)) is not None:
            pages = active.stager.pages_of(collection.name)
            done[collection.name] = (
                CollectionResult(
                    CollectionStatus.SUCCEEDED, pages, seen=confirmed.items, current=confirmed.items
                ),
                store.ApplyResult(added=0, removed=0, present_before=confirmed.items),
            )
        elif collection.copy_mode is None:
            catalog.append((collection, item.outcome))
        else:
            remove = collection.name in removable
            applied = await store.apply_snapshot(
                connection, run, remove_absent=remove, copy_mode=collection.copy_mode
            )
            result = _collection_result(
                active, collection, item.outcome, applied, removed_absent=remove
            )
            done[collection.name] = (result, applied)
    if catalog:
        names = [collection.name for collection, _ in catalog]
        closes = await store.apply_catalog_closes(
            connection, run, names, removable=[name for name in names if name in removable]
        )
        opens = await store.apply_catalog_opens(connection, run, names)
        for collection, outcome in catalog:
            name = collection.name
            # New versions of changed items are inserted along with new items.
            applied = dataclasses.replace(closes[name], added=opens[name] - closes[name].changed)
            result = _collection_result(
                active, collection, outcome, applied, removed_absent=name in removable
            )
            done[name] = (result, applied)
    results: dict[str, tuple[CollectionResult, store.ApplyResult | None]] = {}
    for item in fetched:
        result, diff = done[item.collection.name]
        if result.status is CollectionStatus.PARTIAL:
            # Not every item of the snapshot is stored: count what was staged.
            seen = await store.distinct_staged(connection, item.collection)
            result = dataclasses.replace(result, seen=seen)
        verdict = withheld.get(item.collection.name)
        if verdict is not None and result.error is None:
            result = dataclasses.replace(
                result,
                error=f"mass-delete guard: {verdict}; added {item.collection.noun} were "
                f"stored, removals withheld. If the removals are real, run: syncd sync "
                f"--tenant {run.tenant} --allow-mass-delete",
            )
        results[item.collection.name] = (result, diff)
    return results


async def _apply_guarded(
    active: _ActiveRun, fetched: Sequence[_Fetched], settings: config.SyncSettings
) -> dict[str, tuple[CollectionResult, store.ApplyResult | None]]:
    """Applies every collection under the mass-delete guard, each judged on its own.

    Applies first and judges after, inside one savepoint: in the usual case (the guard lets
    every collection's removals through) each diff runs once, with no counting pass before
    it. When the guard trips for some collection, the savepoint is rolled back and
    everything applied again, those collections' removals withheld.
    """
    connection, run = active.connection, active.run
    savepoint = await connection.begin_nested()
    results = await _apply_all(active, fetched, withheld={})
    verdicts: dict[str, str] = {}
    for name, (_, applied) in results.items():
        if applied is None or not applied.removed:
            continue
        collection = collections.COLLECTIONS[name]
        verdict = mass_delete_verdict(
            removals=applied.removed,
            present_before=applied.present_before,
            baseline=await store.delete_baseline(
                connection, run, settings.delete_baseline_window_s, name
            ),
            snapshot_empty=active.stager.items_of(name) == 0,
            settings=settings,
            noun=collection.noun,
        )
        if verdict is not None:
            verdicts[name] = verdict
    if not verdicts:
        await savepoint.commit()
        return results
    await savepoint.rollback()
    return await _apply_all(active, fetched, withheld=verdicts)


def _run_status(results: Mapping[str, CollectionResult]) -> RunStatus:
    """Succeeded when every available collection did; failed when every one failed (or none
    is available); partial otherwise."""
    available = [r.status for r in results.values() if r.status != CollectionStatus.UNAVAILABLE]
    if all(status == CollectionStatus.FAILED for status in available):
        return RunStatus.FAILED
    if all(status == CollectionStatus.SUCCEEDED for status in available):
        return RunStatus.SUCCEEDED
    return RunStatus.PARTIAL


def _run_error(results: Mapping[str, CollectionResult]) -> str | None:
    """The failed and partial collections' messages, each message once with its collections."""
    by_message: dict[str, list[str]] = {}
    for name, result in results.items():
        if result.error and result.status in (CollectionStatus.FAILED, CollectionStatus.PARTIAL):
            by_message.setdefault(result.error, []).append(name)
    if not by_message:
        if results and all(r.status == CollectionStatus.UNAVAILABLE for r in results.values()):
            return (
                "no collection is available: the server answered 404 for every one "
                f"({', '.join(results)}); is url the VSPC server's root?"
            )
        return None
    return "; ".join(f"{', '.join(names)}: {message}" for message, names in by_message.items())


def _diffs_anything(active: _ActiveRun, fetched: Sequence[_Fetched]) -> bool:
    """Whether some fetched collection differs from its confirmed snapshot (and so must be
    diffed against what is stored); else the run only records itself."""
    unchanged = active.stager.unchanged
    return any(
        item.outcome is not None and item.collection.name not in unchanged for item in fetched
    )


async def _apply(
    active: _ActiveRun,
    fetched: Sequence[_Fetched],
    settings: config.SyncSettings,
    allow_mass_delete: bool,
    clean: Callable[[str], str],
) -> _Applied:
    """Applies every collection that was fetched (uncommitted) and sums up the run."""
    if not _diffs_anything(active, fetched):
        applied = await _apply_all(active, fetched, withheld={})
    elif allow_mass_delete:
        await store.prepare_apply(active.connection)
        applied = await _apply_all(active, fetched, withheld={})
    else:
        await store.prepare_apply(active.connection)
        applied = await _apply_guarded(active, fetched, settings)
    results: dict[str, CollectionResult] = {}
    for name, (result, _) in applied.items():
        if result.error is not None:
            result = dataclasses.replace(result, error=clean(result.error))
        results[name] = result
    status = _run_status(results)
    links = [(c, results.get(c.name)) for c in collections.LINK_COLLECTIONS]
    applied_links = [r for _, r in links if r is not None and r.current is not None]
    current_pairs: int | None = None
    confirmed = False
    if status is not RunStatus.FAILED:
        # Pairs of a mode not applied this run (failed, unavailable, not configured) still
        # count; and the tenant's pairs are confirmed only if none of them exist.
        unapplied = 0
        for collection, link_result in links:
            if link_result is None or link_result.current is None:
                assert collection.copy_mode is not None
                before = active.run.confirmed.get(collection.name)
                unapplied += (
                    before.items  # not applied since it was confirmed: still what is stored
                    if before is not None
                    else await store.open_links(
                        active.connection, active.run.tenant_id, collection.copy_mode
                    )
                )
        current_pairs = sum(r.current or 0 for r in applied_links) + unapplied
        confirmed = unapplied == 0 and all(
            r.status == CollectionStatus.SUCCEEDED for r in applied_links
        )
    error = _run_error(results)
    return _Applied(
        status=status,
        pairs_seen=sum(r.seen for r in applied_links),
        added=sum(r.added for r in applied_links),
        removed=sum(r.removed for r in applied_links),
        current_pairs=current_pairs,
        error=None if error is None else clean(error),
        collections=results,
        confirmed=confirmed,
        unavailable=tuple(
            name for name, r in results.items() if r.status == CollectionStatus.UNAVAILABLE
        ),
    )


def _confirmations(
    fetched: Sequence[_Fetched],
    results: Mapping[str, CollectionResult],
    unchanged: Mapping[str, store.ConfirmedSnapshot],
    before: Mapping[str, store.ConfirmedSnapshot],
) -> tuple[dict[str, store.ConfirmedSnapshot], list[str]]:
    """The snapshots this run confirms (complete, applied with removals) and the confirmed
    snapshots it makes stale (their collection applied any other way). A collection not
    applied (failed, unavailable, or unchanged) keeps what it had."""
    confirm: dict[str, store.ConfirmedSnapshot] = {}
    forget: list[str] = []
    for item in fetched:
        name = item.collection.name
        result = results[name]
        if item.outcome is None or name in unchanged:
            continue
        key = item.outcome.key()
        if result.status is CollectionStatus.SUCCEEDED and key is not None:
            assert result.current is not None
            confirm[name] = store.ConfirmedSnapshot(key, result.current)
        elif name in before:
            forget.append(name)
    return confirm, forget


# --- the one entry point -------------------------------------------------------------------


@dataclass(frozen=True)
class Shared:
    """What the runs of one process share (`open_shared`)."""

    http: vspc.HttpPool
    """HTTP connections (`vspc.open_http_pool`)."""
    apply_slots: asyncio.Semaphore
    """Runs that may diff and write at once: bulk writes of more runs than the database
    has cores only contend (for the same index pages and the table's end) and go slower
    in sum."""


@contextlib.asynccontextmanager
async def open_shared(max_concurrent_applies: int) -> AsyncIterator[Shared]:
    """The resources a process's runs share, for as long as it syncs (`[database]
    max_concurrent_applies` bounds the runs applying at once)."""
    async with vspc.open_http_pool() as http:
        yield Shared(http, asyncio.Semaphore(max_concurrent_applies))


async def sync_tenant(
    tenant: config.Tenant,
    engine: AsyncEngine,
    *,
    allow_mass_delete: bool = False,
    observer: vspc.RequestObserver | None = None,
    progress: ProgressSink | None = None,
    scrubber: logs.SecretScrubber | None = None,
    replica: str | None = None,
    shared: Shared | None = None,
) -> SyncResult:
    """Syncs one tenant's snapshot into the database and records the run.

    Always returns a `SyncResult` (cancellation aside, which is recorded and re-raised):
    the tenant's errors, a bound that trips, `[sync] run_timeout`, the database and bugs
    all become a `failed` (or `partial`) result, recorded in the run's row once it exists.
    `scrubber` (the process's log scrubber) learns the tokens obtained during the run; the
    tenant's own secrets are scrubbed from every message whether or not it is given.
    `replica` is recorded on the run (default: `config.default_replica_name()`). `shared`
    (`open_shared`) lends the run the process's HTTP connections and apply slots; without
    it the run opens its own connections and applies unbounded by other runs.
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
        # The run's tokens stay known to the scrubber at least until its messages are clean.
        with secrets.issued_tokens() as issued_tokens:
            async with _run_lifecycle(engine, tenant, clean, progress, replica) as active:
                if active is None:
                    log.info(
                        "tenant busy: another syncd process is syncing it; skipped",
                        tenant=tenant.name,
                    )
                    return SyncResult(tenant=tenant.name, status=RunStatus.SKIPPED, error=BUSY)
                applied = await _fetch_and_apply(
                    active,
                    tenant,
                    vspc.open_client(
                        tenant,
                        pool=None if shared is None else shared.http,
                        observer=observer,
                        on_secret=issued_tokens,
                    ),
                    None if shared is None else shared.apply_slots,
                    clean,
                    allow_mass_delete,
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
        collections=applied.collections,
    )
    (log.error if result.status is RunStatus.FAILED else log.info)(
        "sync failed" if result.status is RunStatus.FAILED else "sync finished",
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


# A run stopped by run_timeout says how long it queued for an apply slot, if this long.
APPLY_WAIT_WORTH_TELLING_S = 1.0


async def _fetch_and_apply(
    active: _ActiveRun,
    tenant: config.Tenant,
    client_session: contextlib.AbstractAsyncContextManager[vspc.VspcClient],
    apply_slots: asyncio.Semaphore | None,
    clean: Callable[[str], str],
    allow_mass_delete: bool,
) -> _Applied:
    """Fetches the snapshots into staging and applies them, all within `run_timeout`;
    commits.

    `client_session` (`vspc.open_client`) is entered within the deadline; a run with
    anything to diff waits for one of `apply_slots` to apply it. The run's messages
    (server text among them) pass through `clean` before they are stored.
    """
    settings = tenant.settings
    deadline = asyncio.timeout(settings.run_timeout_s)
    queued_at: float | None = None  # while waiting for an apply slot: since when
    slot_wait_s = 0.0  # how long the run waited for its apply slot
    try:
        async with deadline:
            async with client_session as client:
                fetched = await _fetch(client, active, collections.by_names(settings.collections))
            await active.stager.finish(fetched)
            slot = apply_slots if _diffs_anything(active, fetched) else None
            queued_at = time.monotonic()
            async with slot or contextlib.nullcontext():
                slot_wait_s, queued_at = time.monotonic() - queued_at, None
                applied = await _apply(active, fetched, settings, allow_mass_delete, clean)
                confirm, forget = _confirmations(
                    fetched, applied.collections, active.stager.unchanged, active.run.confirmed
                )
                await store.save_confirmed(
                    active.connection, active.run, confirm=confirm, forget=forget
                )
                _log_availability(tenant.name, active.run.unavailable_before, applied.unavailable)
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
                        collections={
                            name: result.as_json() for name, result in applied.collections.items()
                        },
                        confirmed=applied.confirmed,
                        unavailable=applied.unavailable,
                    ),
                    reset_baseline=allow_mass_delete and applied.status is RunStatus.SUCCEEDED,
                )
                await active.connection.commit()
    except TimeoutError as exc:
        if not deadline.expired():
            raise
        if queued_at is not None:
            slot_wait_s = time.monotonic() - queued_at
        advice = (
            f": it had waited {slot_wait_s:.0f}s for other runs to finish applying; raise "
            "[database] max_concurrent_applies if the database server has cores to spare, "
            "or [sync] run_timeout"
            if slot_wait_s >= APPLY_WAIT_WORTH_TELLING_S
            else "; if the tenant is that big or that slow, raise [sync] run_timeout"
        )
        raise errors.BoundExceeded(
            f"tenant {tenant.name!r}: the run took longer than run_timeout "
            f"({settings.run_timeout_s:g}s) and was stopped, nothing applied{advice}",
            key="run_timeout",
        ) from exc
    return applied


async def _fetch(
    client: vspc.VspcClient, active: _ActiveRun, wanted: Sequence[Collection]
) -> list[_Fetched]:
    """Fetches every collection in `wanted` concurrently into staging, under one bound of
    pages in flight for the tenant. A collection's `TenantError` is its own outcome; any
    other exception (the database, a bug) cancels the others and propagates."""
    slots = client.page_slots()

    async def one(collection: Collection) -> _Fetched:
        try:
            outcome = await client.fetch_snapshot(
                active.stager.sink(collection), collection=collection, slots=slots
            )
        except errors.CollectionUnavailable as exc:
            return _Fetched(collection, error=str(exc), unavailable=True)
        except errors.TenantError as exc:
            return _Fetched(collection, error="; ".join(errors.cause_chain(exc)))
        return _Fetched(collection, outcome=outcome)

    tasks = [asyncio.create_task(one(collection)) for collection in wanted]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _log_availability(tenant: str, before: Sequence[str], now: Sequence[str]) -> None:
    """Says once when a collection becomes unavailable (or available again), not every run."""
    for name in now:
        if name not in before:
            log.warning(
                "collection unavailable: the server answered 404 (an older VSPC); recorded as "
                "unavailable, not as a failure",
                tenant=tenant,
                collection=name,
            )
    for name in before:
        if name not in now:
            log.info("collection no longer unavailable", tenant=tenant, collection=name)


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
    shared: Shared | None = None,
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
            shared=shared,
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
    max_concurrent_applies: int = config.DEFAULT_MAX_CONCURRENT_APPLIES,
    allow_mass_delete: bool = False,
    progress: ProgressSink | None = None,
    scrubber: logs.SecretScrubber | None = None,
    replica: claims.Replica | None = None,
) -> list[SyncResult]:
    """Syncs `tenants` concurrently, at most `max_concurrent_tenants` at once and
    `max_concurrent_applies` of them applying at once (`open_shared`).

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
                shared=shared,
            )
        return await sync_tenant(
            tenant,
            engine,
            allow_mass_delete=allow_mass_delete,
            progress=progress,
            scrubber=scrubber,
            shared=shared,
        )

    def crashed(tenant: config.Tenant, exc: Exception) -> SyncResult:
        message = errors.clean_text(f"internal error: {type(exc).__name__}: {exc}")
        return SyncResult(tenant=tenant.name, status=RunStatus.FAILED, error=message)

    async with open_shared(max_concurrent_applies) as shared:
        return await run_each(tenants, one, max_concurrent=max_concurrent_tenants, on_crash=crashed)
