"""When each tenant syncs: local timers, claims, the global concurrency cap.

One APScheduler job per tenant is this replica's local clock; it decides nothing on its
own. When it fires, the replica asks the database (`claims.claim`) whether the tenant is
due and free; only the replica whose claim succeeds runs it, with the same
`sync.sync_tenant` as `syncd sync`, and then sets the next due time (`claims.release`).
The fire after that is set from what the database said (the due time, or when another
replica's run should end), plus jitter, so the replicas look at a tenant about once per
interval each, and whichever looks first after it is due runs it. The job's own interval
trigger stays underneath: whatever happens, every tenant is looked at once per period.

The decisions (jitter, stagger, misfire grace, what a reload changes) are pure functions at
the top, as are the claims' (`claims`); `TenantScheduler` applies them.

A failing tenant only ever holds its own job and, while it runs, one concurrency slot: its
errors become a `failed` result, its backoff moves only its own due time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from apscheduler.job import Job
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import claims, config, errors, metrics, status, sync
from syncd.status import RunStatus
from syncd.sync import SyncResult

log = structlog.get_logger(__name__)

JOB_PREFIX = "sync:"
# Random delay added to each fire: at most this fraction of the period, and this many seconds.
JITTER_FRACTION = 0.1
JITTER_MAX_S = 60.0
# How long after a missed fire time (a suspended host, a stalled loop) a run still happens.
MISFIRE_GRACE_MIN_S = 1.0
MISFIRE_GRACE_MAX_S = 600.0
# Waiting for runs that were cancelled at shutdown to record themselves as interrupted.
CANCEL_WAIT_S = 10.0

SyncFunction = Callable[[config.Tenant], Awaitable[SyncResult]]


# --- decisions (pure) ----------------------------------------------------------------------


def jitter_s(period_s: float) -> float:
    """Random delay allowed on each fire, so tenants on the same schedule spread out."""
    return min(period_s * JITTER_FRACTION, JITTER_MAX_S)


def misfire_grace_s(period_s: float) -> int:
    """How late a fire may still run: half a period, within sane bounds (whole seconds).

    Later than that, the next regular fire is close anyway; coalescing keeps it to one run.
    """
    return math.ceil(min(max(period_s / 2, MISFIRE_GRACE_MIN_S), MISFIRE_GRACE_MAX_S))


def stagger_offsets_s(count: int, spread_s: float) -> list[float]:
    """Delays of `count` first runs, evenly spread over `spread_s` (the first at 0)."""
    if count <= 0:
        return []
    step = spread_s / count
    return [index * step for index in range(count)]


@dataclass(frozen=True)
class ReloadPlan:
    """What a new tenant list changes, by tenant name."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]


def plan_reload(current: Mapping[str, config.Tenant], new: Sequence[config.Tenant]) -> ReloadPlan:
    """Compares the scheduled tenants with a newly loaded list (kept in the new order)."""
    new_names = {tenant.name for tenant in new}
    return ReloadPlan(
        added=tuple(t.name for t in new if t.name not in current),
        removed=tuple(name for name in current if name not in new_names),
        changed=tuple(t.name for t in new if t.name in current and current[t.name] != t),
        unchanged=tuple(t.name for t in new if current.get(t.name) == t),
    )


def make_trigger(settings: config.SyncSettings, now: datetime) -> tuple[Any, float]:
    """(APScheduler trigger, its period in seconds) for a tenant's schedule.

    Cron expressions are read in the host's local time zone, as crontab does.
    """
    period_s = claims.period_s(settings, now)
    if settings.cron is None:
        trigger = IntervalTrigger(seconds=period_s, jitter=jitter_s(period_s), timezone=UTC)
        return trigger, period_s
    return claims.cron_trigger(settings, jitter_s=jitter_s(period_s)), period_s


# --- state -----------------------------------------------------------------------------------


@dataclass
class TenantState:
    """What the daemon knows about one tenant, as it changes (`status()` freezes it)."""

    tenant: config.Tenant
    period_s: float
    # Claim once regardless of the due time (the tenant changed on reload: run it soon).
    force_claim: bool = False
    consecutive_failures: int = 0
    running_since: datetime | None = None
    queued_since: datetime | None = None
    waiting_for: str | None = None
    last_run_at: datetime | None = None
    last_finished_at: datetime | None = None
    last_status: RunStatus | None = None
    last_error: str | None = None
    last_run_id: int | None = None
    last_duration_s: float | None = None
    last_success_at: datetime | None = None
    pairs: int | None = None
    collections: dict[str, dict[str, Any]] | None = None
    last_replica: str | None = None
    # The newest run known here (this replica's, or any replica's read from the database).
    seen_run_id: int = 0
    # From the last look at the database: the due time, and who else holds a claim.
    due_at: datetime | None = None
    claimed_by: str | None = None


class _TenantOfJob(logging.Filter):
    """Adds `tenant` to APScheduler's own log records about a tenant's job.

    APScheduler logs "Running job ..." from a task it creates, outside the context our job
    binds, so structlog's contextvars cannot reach those lines; the job is in the arguments.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, Job) and str(arg.id).startswith(JOB_PREFIX):
                record.tenant = str(arg.id).removeprefix(JOB_PREFIX)
        return True


_APSCHEDULER_LOGGERS = ("apscheduler.scheduler", "apscheduler.executors.default")


@contextlib.contextmanager
def _tenant_on_apscheduler_lines() -> Iterator[None]:
    job_filter = _TenantOfJob()
    loggers = [logging.getLogger(name) for name in _APSCHEDULER_LOGGERS]
    for logger in loggers:
        logger.addFilter(job_filter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(job_filter)


class TenantScheduler:
    """Runs every tenant's sync when it is due and this replica claims it, at most
    `max_concurrent_tenants` at once.

    Build it with `open_scheduler`, which starts it and stops it gracefully on exit.
    `blocked()` names why no run may start now (the database is down), or returns None.
    """

    def __init__(
        self,
        *,
        sync: SyncFunction,
        engine: AsyncEngine,
        daemon: config.DaemonConfig,
        sync_metrics: metrics.Metrics,
        blocked: Callable[[], str | None],
        on_database_error: Callable[[], None],
    ) -> None:
        self._sync = sync
        self._engine = engine
        self._daemon = daemon
        self._replica = claims.Replica.of(daemon)
        self._metrics = sync_metrics
        self._blocked = blocked
        self._on_database_error = on_database_error
        self._slots = asyncio.Semaphore(daemon.max_concurrent_tenants)
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._states: dict[str, TenantState] = {}
        self._queued: set[asyncio.Task[Any]] = set()
        self._running: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._rng = random.Random()  # noqa: S311 - spreading timers, not cryptography

    @property
    def running(self) -> bool:
        """True between start and the beginning of shutdown."""
        return bool(self._scheduler.running) and not self._stopping

    # --- configuration -------------------------------------------------------------------

    def apply(
        self, tenants: Sequence[config.Tenant], daemon: config.DaemonConfig, *, reload: bool = False
    ) -> ReloadPlan:
        """Schedules `tenants`: new and changed ones are looked at soon, removed ones dropped.

        A look at a new tenant runs it if it is due (a tenant never seen is due at once). On
        `reload`, changed tenants run soon whatever their due time, so a new key or
        schedule shows at once. `daemon.max_concurrent_tenants` and `replica_name` are fixed
        for the process; the other `[daemon]` settings apply from now on.
        """
        self._daemon = daemon.model_copy(
            update={
                "max_concurrent_tenants": self._daemon.max_concurrent_tenants,
                "replica_name": self._daemon.replica_name,
            }
        )
        self._replica = claims.Replica(self._replica.name, daemon.max_failure_backoff_factor)
        plan = plan_reload({name: s.tenant for name, s in self._states.items()}, tenants)
        for name in plan.removed:
            self._remove(name)
        by_name = {tenant.name: tenant for tenant in tenants}
        fresh = [by_name[name] for name in (*plan.changed, *plan.added)]
        now = datetime.now(UTC)
        offsets = stagger_offsets_s(len(fresh), self._daemon.startup_spread_s)
        changed = set(plan.changed) if reload else set()
        for tenant, offset_s in zip(fresh, offsets, strict=True):
            self._add(
                tenant,
                first_run=now + timedelta(seconds=offset_s),
                force_claim=tenant.name in changed,
            )
        return plan

    def _add(self, tenant: config.Tenant, *, first_run: datetime, force_claim: bool) -> None:
        trigger, period_s = make_trigger(tenant.settings, datetime.now(UTC))
        # What is known of its runs comes back from the database at the next refresh.
        self._states[tenant.name] = TenantState(
            tenant=tenant, period_s=period_s, force_claim=force_claim
        )
        self._metrics.tenant_scheduled(tenant.name, period_s)
        self._scheduler.add_job(
            self._fire,
            trigger,
            args=[tenant.name],
            id=JOB_PREFIX + tenant.name,
            name=f"sync {tenant.name}",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=misfire_grace_s(period_s),
            next_run_time=first_run,
            replace_existing=True,
        )
        log.info(
            "tenant scheduled",
            tenant=tenant.name,
            schedule=claims.schedule_text(tenant.settings),
            first_look=status.iso(first_run),
        )

    def _remove(self, name: str) -> None:
        # A run in progress goes on to its end; only its result is no longer recorded.
        with contextlib.suppress(Exception):
            self._scheduler.remove_job(JOB_PREFIX + name)
        self._states.pop(name, None)
        self._metrics.forget_tenant(name)
        log.info("tenant unscheduled", tenant=name)

    def run_waiting_soon(self) -> None:
        """Brings forward the looks skipped while the daemon was not ready, staggered."""
        waiting = [s for s in self._states.values() if s.waiting_for is not None]
        now = datetime.now(UTC)
        offsets = stagger_offsets_s(len(waiting), self._daemon.startup_spread_s)
        for state, offset_s in zip(waiting, offsets, strict=True):
            state.waiting_for = None
            self._move_next_run(state.tenant.name, now + timedelta(seconds=offset_s))

    def _move_next_run(self, name: str, when: datetime) -> None:
        with contextlib.suppress(Exception):  # the job left with its tenant meanwhile
            self._scheduler.modify_job(JOB_PREFIX + name, next_run_time=when)

    def _look_again(self, state: TenantState, monotonic_s: float, delay_s: float) -> None:
        """Sets the tenant's next local fire `delay_s` after the instant `monotonic_s` (this
        process's monotonic clock), plus jitter.

        The jitter spreads the replicas' looks, so which one claims a due tenant first is
        a matter of chance: the runs spread over the replicas.
        """
        if self._stopping:
            return
        jitter = self._rng.uniform(0.0, jitter_s(state.period_s))
        since_s = time.monotonic() - monotonic_s
        when = datetime.now(UTC) + timedelta(seconds=delay_s + jitter - since_s)
        self._move_next_run(state.tenant.name, when)

    # --- runs ----------------------------------------------------------------------------

    async def _fire(self, name: str) -> None:
        """The job of tenant `name`: one look, and a run if this replica claims the tenant."""
        state = self._states.get(name)
        if state is None or self._stopping:
            return
        with structlog.contextvars.bound_contextvars(tenant=name):
            reason = self._blocked()
            if reason is not None:
                state.waiting_for = reason
                log.info("run skipped: not ready", reason=reason)
                return
            state.waiting_for = None
            task = asyncio.current_task()
            assert task is not None
            self._queued.add(task)
            state.queued_since = datetime.now(UTC)
            try:
                # A slot first, then the claim: a replica with no free slot leaves a due
                # tenant to the others instead of holding it while it waits.
                async with self._slots:
                    self._queued.discard(task)
                    state.queued_since = None
                    if self._stopping:
                        return
                    self._running.add(task)
                    try:
                        await self._claim_and_run(state)
                    finally:
                        self._running.discard(task)
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
                # Shutdown cancelled a queued run; nothing to record.
                task.uncancel()
                return
            finally:
                self._queued.discard(task)
                state.queued_since = None

    async def _claim_and_run(self, state: TenantState) -> None:
        tenant = state.tenant
        try:
            look = await claims.claim(
                self._engine, tenant, self._replica.name, regardless_of_due=state.force_claim
            )
        except errors.DatabaseError as exc:
            # The tenant's own timer looks again within a period; readiness is re-checked.
            self._metrics.claims.labels(result="error").inc()
            log.warning("cannot claim the tenant", error=str(exc))
            self._on_database_error()
            return
        state.force_claim = False
        self._metrics.claims.labels(result=str(look.outcome)).inc()
        state.due_at, state.claimed_by = look.due_at, look.claimed_by
        if look.outcome is not claims.Outcome.WON:
            log.debug(
                "not claimed",
                outcome=str(look.outcome),
                due_at=status.iso(look.due_at),
                claimed_by=look.claimed_by,
            )
            self._look_again(state, look.monotonic_s, claims.next_look_s(look, tenant.settings))
            return
        self._metrics.runs_in_progress.inc()
        state.running_since = datetime.now(UTC)
        try:
            result, how = await self._run(tenant)
        finally:
            self._metrics.runs_in_progress.dec()
            started, state.running_since = state.running_since, None
        # One instant on both clocks: the due time is computed from it on the database's
        # clock, the next local fire on this process's.
        ended_s, ended = time.monotonic(), datetime.now(UTC)
        released: claims.Released | None = None
        try:
            released = await claims.release(
                self._engine,
                look,
                self._replica,
                tenant.settings,
                how,
                ended_monotonic_s=ended_s,
            )
        except errors.DatabaseError as exc:
            # The claim stays: this replica takes it back at its next look (or it expires).
            log.warning("cannot release the tenant's claim", error=str(exc))
            self._on_database_error()
        self._record(state.tenant.name, started, ended, result, how, released)
        if released is not None:
            state.due_at, state.claimed_by = released.due_at, None
            delay_s = (released.due_at - look.db_time(ended_s)).total_seconds()
            self._look_again(state, ended_s, claims.bound_look_s(delay_s, state.period_s))

    async def _run(self, tenant: config.Tenant) -> tuple[SyncResult, claims.Ended]:
        """(result, what it means for the schedule) of one run.

        `sync_tenant` returns a result whatever fails inside it; only cancellation comes
        out as an exception, and at shutdown that is expected.
        """
        try:
            result = await self._sync(tenant)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # sync_tenant has recorded the run as interrupted; end this job quietly. The
            # tenant stays due: another replica runs it.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            interrupted = SyncResult(tenant.name, RunStatus.FAILED, error=sync.INTERRUPTED)
            return interrupted, claims.Ended.NOT_RUN
        if result.database_failure:
            # The database's trouble, not the tenant's: no backoff, but re-check readiness.
            self._on_database_error()
        return result, claims.ended(result.status, database_failure=result.database_failure)

    def _record(
        self,
        name: str,
        started: datetime | None,
        finished: datetime,
        result: SyncResult,
        how: claims.Ended,
        released: claims.Released | None,
    ) -> None:
        state = self._states.get(name)
        if state is None:
            return  # the tenant left the configuration while it ran
        if released is not None:
            state.consecutive_failures = released.failures
        elif how is claims.Ended.TENANT_FAILED:
            state.consecutive_failures += 1
        elif how is claims.Ended.OK:
            state.consecutive_failures = 0
        state.last_run_at = started
        state.last_finished_at = finished
        state.last_status = result.status
        state.last_error = result.error
        state.last_run_id = result.run_id
        state.last_duration_s = round(result.duration_s, 3)
        if result.run_id is not None:
            state.last_replica = self._replica.name
            state.seen_run_id = max(state.seen_run_id, result.run_id)
        if result.status is RunStatus.SUCCEEDED:
            state.last_success_at = finished
        if result.current_pairs is not None:
            state.pairs = result.current_pairs
        if result.collections:
            state.collections = {
                name: outcome.as_json() for name, outcome in result.collections.items()
            }
        self._metrics.record_run(result, state.consecutive_failures)
        if how is claims.Ended.TENANT_FAILED and state.consecutive_failures > 1:
            log.info(
                "backing off after consecutive failures",
                tenant=name,
                consecutive_failures=state.consecutive_failures,
                due_at=None if released is None else status.iso(released.due_at),
            )

    def refresh(self, stored: Sequence[status.TenantStatus]) -> None:
        """Takes in what the database knows of each tenant: due time, claim, and the latest
        run when it is newer than any this process has seen (another replica's, or one
        from before this process started), so `/status` and the gauges show the tenant's
        state whichever replica ran it."""
        for row in stored:
            state = self._states.get(row.tenant)
            if state is None:
                continue
            state.due_at, state.claimed_by = row.due_at, row.claimed_by
            newer = row.last_run_id is not None and row.last_run_id > state.seen_run_id
            if not newer or state.running_since is not None:
                continue
            assert row.last_run_id is not None
            state.seen_run_id = row.last_run_id
            state.last_run_id = row.last_run_id
            state.last_run_at = row.last_run_at
            state.last_status = row.last_status
            state.last_finished_at = row.last_finished_at
            state.last_error = row.last_error
            state.last_duration_s = row.last_duration_s
            state.last_replica = row.last_replica
            state.last_success_at = row.last_success_at
            state.pairs = row.pairs
            state.collections = (
                None
                if row.collections is None
                else {name: dict(outcome) for name, outcome in row.collections.items()}
            )
            state.consecutive_failures = row.consecutive_failures
            self._metrics.seed_tenant(
                row.tenant, row.pairs or 0, row.last_success_at, row.consecutive_failures
            )

    # --- reporting -----------------------------------------------------------------------

    def status(self) -> list[status.TenantStatus]:
        """Every scheduled tenant's status, as of now (no secrets: names, times, counts)."""
        now = datetime.now(UTC)
        rows = []
        for name, state in self._states.items():
            job = self._scheduler.get_job(JOB_PREFIX + name)
            next_run = job.next_run_time if job is not None and not self._stopping else None
            success = state.last_success_at
            rows.append(
                status.TenantStatus(
                    tenant=name,
                    last_run_at=state.last_run_at,
                    last_status=state.last_status,
                    last_success_at=success,
                    pairs=state.pairs,
                    age_s=None if success is None else (now - success).total_seconds(),
                    collections=state.collections,
                    schedule=claims.schedule_text(state.tenant.settings),
                    period_s=state.period_s,
                    running_since=state.running_since,
                    queued_since=state.queued_since,
                    waiting_for=state.waiting_for,
                    last_finished_at=state.last_finished_at,
                    last_error=state.last_error,
                    last_run_id=state.last_run_id,
                    last_duration_s=state.last_duration_s,
                    next_run_at=next_run,
                    consecutive_failures=state.consecutive_failures,
                    last_replica=state.last_replica,
                    due_at=state.due_at,
                    claimed_by=state.claimed_by,
                )
            )
        return rows

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Starts firing jobs (call from within the running event loop)."""
        self._scheduler.start()

    async def stop(self, grace_s: float) -> None:
        """Starts no more runs; lets runs in progress finish within `grace_s`, then cancels.

        A cancelled run is recorded as failed "interrupted" by `sync_tenant` itself, and its
        claim released with the tenant still due, so another replica runs it.
        """
        if self._stopping:
            return
        self._stopping = True
        if self._scheduler.running:
            self._scheduler.pause()
        for task in self._queued:
            task.cancel()
        running = set(self._running)
        if running:
            log.info("waiting for runs in progress", runs=len(running), grace_s=grace_s)
            _, late = await asyncio.wait(running, timeout=grace_s)
            if late:
                log.warning("grace period over: cancelling runs in progress", runs=len(late))
                for task in late:
                    task.cancel()
                await asyncio.wait(late, timeout=CANCEL_WAIT_S)
        queued = set(self._queued)
        if queued:
            await asyncio.wait(queued, timeout=CANCEL_WAIT_S)
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
            # AsyncIOScheduler.shutdown is scheduled with call_soon: let it run.
            await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def open_scheduler(
    tenants: Sequence[config.Tenant],
    *,
    sync: SyncFunction,
    engine: AsyncEngine,
    daemon: config.DaemonConfig,
    sync_metrics: metrics.Metrics,
    blocked: Callable[[], str | None],
    on_database_error: Callable[[], None],
    grace_s: Callable[[], float],
) -> AsyncIterator[TenantScheduler]:
    """A started `TenantScheduler` for `tenants`, stopped on exit within `grace_s()` seconds.

    `grace_s` is read at exit, so a reloaded `shutdown_grace` applies.
    """
    scheduler = TenantScheduler(
        sync=sync,
        engine=engine,
        daemon=daemon,
        sync_metrics=sync_metrics,
        blocked=blocked,
        on_database_error=on_database_error,
    )
    with _tenant_on_apscheduler_lines():
        scheduler.apply(tenants, daemon)
        scheduler.start()
        try:
            yield scheduler
        finally:
            await scheduler.stop(grace_s())
