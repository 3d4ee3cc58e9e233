"""When each tenant syncs: APScheduler wiring, the global concurrency cap, failure backoff.

One APScheduler job per tenant awaits the same `sync.sync_tenant` as `syncd sync`; this
module adds only timing. The decisions (jitter, stagger, backoff, misfire grace, what a
reload changes) are pure functions at the top; `TenantScheduler` applies them.

A failing tenant only ever holds its own job and, while it runs, one concurrency slot: its
errors become a `failed` result, its backoff moves only its own next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from apscheduler.job import Job
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from syncd import config, metrics, status, sync
from syncd.models import RunStatus
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


def failure_backoff_factor(consecutive_failures: int, max_factor: float) -> float:
    """How many periods to wait after `consecutive_failures` failed runs in a row.

    The first failure keeps the schedule (one period); each further one doubles the wait,
    up to `max_factor` periods.
    """
    if consecutive_failures <= 1:
        return 1.0
    return min(2.0 ** min(consecutive_failures - 1, 60), max_factor)


def next_run_after_failure(
    *,
    planned: datetime | None,
    finished_at: datetime,
    period_s: float,
    consecutive_failures: int,
    max_factor: float,
) -> datetime | None:
    """The earliest time of a failing tenant's next run, or None to keep the `planned` one."""
    factor = failure_backoff_factor(consecutive_failures, max_factor)
    if factor <= 1.0:
        return None
    earliest = finished_at + timedelta(seconds=period_s * factor)
    if planned is not None and planned >= earliest:
        return None
    return earliest


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


def schedule_text(settings: config.SyncSettings) -> str:
    """The tenant's schedule as people read it ("every 900s", "cron */15 * * * *")."""
    if settings.cron is not None:
        return f"cron {settings.cron}"
    return f"every {settings.interval_s:g}s"


def make_trigger(settings: config.SyncSettings, now: datetime) -> tuple[Any, float]:
    """(APScheduler trigger, its period in seconds) for a tenant's schedule.

    Cron expressions are read in the host's local time zone, as crontab does.
    """
    if settings.cron is None:
        period_s = settings.interval_s
        trigger = IntervalTrigger(seconds=period_s, jitter=jitter_s(period_s), timezone=UTC)
        return trigger, period_s
    minute, hour, day, month, day_of_week = settings.cron.split()
    plain = CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=day_of_week)
    first = plain.get_next_fire_time(None, now)
    second = plain.get_next_fire_time(first, first + timedelta(seconds=1)) if first else None
    period_s = (second - first).total_seconds() if first and second else settings.interval_s
    trigger = CronTrigger(
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=day_of_week,
        jitter=jitter_s(period_s),
    )
    return trigger, period_s


# --- state -----------------------------------------------------------------------------------


@dataclass
class TenantState:
    """What the daemon knows about one tenant, as it changes (`status()` freezes it)."""

    tenant: config.Tenant
    period_s: float
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
    """Runs every tenant's sync on its schedule, at most `max_concurrent_tenants` at once.

    Build it with `open_scheduler`, which starts it and stops it gracefully on exit.
    `blocked()` names why no run may start now (the database is down), or returns None.
    """

    def __init__(
        self,
        *,
        sync: SyncFunction,
        daemon: config.DaemonConfig,
        sync_metrics: metrics.Metrics,
        blocked: Callable[[], str | None],
        on_database_error: Callable[[], None],
    ) -> None:
        self._sync = sync
        self._daemon = daemon
        self._metrics = sync_metrics
        self._blocked = blocked
        self._on_database_error = on_database_error
        self._slots = asyncio.Semaphore(daemon.max_concurrent_tenants)
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._states: dict[str, TenantState] = {}
        self._queued: set[asyncio.Task[Any]] = set()
        self._running: set[asyncio.Task[Any]] = set()
        self._stopping = False

    @property
    def running(self) -> bool:
        """True between start and the beginning of shutdown."""
        return bool(self._scheduler.running) and not self._stopping

    # --- configuration -------------------------------------------------------------------

    def apply(self, tenants: Sequence[config.Tenant], daemon: config.DaemonConfig) -> ReloadPlan:
        """Schedules `tenants`: new and changed ones run soon, removed ones are dropped.

        `daemon.max_concurrent_tenants` is fixed for the process (the database pool is sized
        from it); the other `[daemon]` settings apply from now on.
        """
        self._daemon = daemon.model_copy(
            update={"max_concurrent_tenants": self._daemon.max_concurrent_tenants}
        )
        plan = plan_reload({name: s.tenant for name, s in self._states.items()}, tenants)
        for name in plan.removed:
            self._remove(name)
        by_name = {tenant.name: tenant for tenant in tenants}
        fresh = [by_name[name] for name in (*plan.changed, *plan.added)]
        now = datetime.now(UTC)
        offsets = stagger_offsets_s(len(fresh), self._daemon.startup_spread_s)
        for tenant, offset_s in zip(fresh, offsets, strict=True):
            self._add(tenant, first_run=now + timedelta(seconds=offset_s))
        return plan

    def _add(self, tenant: config.Tenant, *, first_run: datetime) -> None:
        trigger, period_s = make_trigger(tenant.settings, datetime.now(UTC))
        self._states[tenant.name] = TenantState(tenant=tenant, period_s=period_s)
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
            schedule=schedule_text(tenant.settings),
            first_run=status.iso(first_run),
        )

    def _remove(self, name: str) -> None:
        # A run in progress goes on to its end; only its result is no longer recorded.
        with contextlib.suppress(Exception):
            self._scheduler.remove_job(JOB_PREFIX + name)
        self._states.pop(name, None)
        self._metrics.forget_tenant(name)
        log.info("tenant unscheduled", tenant=name)

    def run_waiting_soon(self) -> None:
        """Brings forward the runs skipped while the daemon was not ready, staggered."""
        waiting = [s for s in self._states.values() if s.waiting_for is not None]
        now = datetime.now(UTC)
        offsets = stagger_offsets_s(len(waiting), self._daemon.startup_spread_s)
        for state, offset_s in zip(waiting, offsets, strict=True):
            state.waiting_for = None
            self._move_next_run(state.tenant.name, now + timedelta(seconds=offset_s))

    def _move_next_run(self, name: str, when: datetime) -> None:
        with contextlib.suppress(Exception):  # the job left with its tenant meanwhile
            self._scheduler.modify_job(JOB_PREFIX + name, next_run_time=when)

    # --- runs ----------------------------------------------------------------------------

    async def _fire(self, name: str) -> None:
        """The job of tenant `name`: one run, unless the daemon is stopping or not ready."""
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
            started: datetime | None = None
            self._queued.add(task)
            state.queued_since = datetime.now(UTC)
            try:
                async with self._slots:
                    self._queued.discard(task)
                    state.queued_since = None
                    if self._stopping:
                        return
                    self._running.add(task)
                    self._metrics.runs_in_progress.inc()
                    state.running_since = datetime.now(UTC)
                    try:
                        result, tenant_failed = await self._run(state.tenant)
                    finally:
                        self._running.discard(task)
                        self._metrics.runs_in_progress.dec()
                        started, state.running_since = state.running_since, None
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
                # Shutdown cancelled a queued run; nothing to record.
                task.uncancel()
                return
            finally:
                self._queued.discard(task)
                state.queued_since = None
            self._record(name, started, result, tenant_failed=tenant_failed)

    async def _run(self, tenant: config.Tenant) -> tuple[SyncResult, bool]:
        """(result, whether it counts as the tenant's own failure) of one run.

        `sync_tenant` returns a result whatever fails inside it; only cancellation comes
        out as an exception, and at shutdown that is expected.
        """
        try:
            result = await self._sync(tenant)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # sync_tenant has recorded the run as interrupted; end this job quietly.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            return SyncResult(tenant.name, RunStatus.FAILED, error=sync.INTERRUPTED), False
        if result.database_failure:
            # The database's trouble, not the tenant's: no backoff, but re-check readiness.
            self._on_database_error()
            return result, False
        return result, result.status is RunStatus.FAILED

    def _record(
        self, name: str, started: datetime | None, result: SyncResult, *, tenant_failed: bool
    ) -> None:
        state = self._states.get(name)
        if state is None:
            return  # the tenant left the configuration while it ran
        finished = datetime.now(UTC)
        if tenant_failed:
            state.consecutive_failures += 1
        elif result.status in (RunStatus.SUCCEEDED, RunStatus.PARTIAL):
            state.consecutive_failures = 0
        state.last_run_at = started
        state.last_finished_at = finished
        state.last_status = result.status
        state.last_error = result.error
        state.last_run_id = result.run_id
        state.last_duration_s = round(result.duration_s, 3)
        if result.status is RunStatus.SUCCEEDED:
            state.last_success_at = finished
        if result.current_pairs is not None:
            state.pairs = result.current_pairs
        if result.collections:
            state.collections = {
                name: outcome.as_json() for name, outcome in result.collections.items()
            }
        self._metrics.record_run(result, state.consecutive_failures)
        if tenant_failed and not self._stopping:
            self._back_off(state, finished)

    def _back_off(self, state: TenantState, finished: datetime) -> None:
        name = state.tenant.name
        job = self._scheduler.get_job(JOB_PREFIX + name)
        if job is None:
            return
        earliest = next_run_after_failure(
            planned=job.next_run_time,
            finished_at=finished,
            period_s=state.period_s,
            consecutive_failures=state.consecutive_failures,
            max_factor=self._daemon.max_failure_backoff_factor,
        )
        if earliest is None:
            return
        when = earliest
        if state.tenant.settings.cron is not None:
            # Keep cron tenants on their cron ticks: the first one after the backoff.
            when = job.trigger.get_next_fire_time(None, earliest) or earliest
        self._move_next_run(name, when)
        log.info(
            "backing off after consecutive failures",
            tenant=name,
            consecutive_failures=state.consecutive_failures,
            next_run=status.iso(when),
        )

    def seed(self, stored: Sequence[status.TenantStatus]) -> None:
        """Fills what is known from the database into tenants this process has not run yet,
        so `/status` and the metrics survive a restart."""
        for row in stored:
            state = self._states.get(row.tenant)
            if state is None or state.last_status is not None:
                continue
            state.last_run_at = row.last_run_at
            state.last_status = row.last_status
            state.last_success_at = row.last_success_at
            state.pairs = row.pairs
            state.collections = (
                None
                if row.collections is None
                else {name: dict(outcome) for name, outcome in row.collections.items()}
            )
            self._metrics.seed_tenant(row.tenant, row.pairs or 0, row.last_success_at)

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
                    schedule=schedule_text(state.tenant.settings),
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
                )
            )
        return rows

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Starts firing jobs (call from within the running event loop)."""
        self._scheduler.start()

    async def stop(self, grace_s: float) -> None:
        """Starts no more runs; lets runs in progress finish within `grace_s`, then cancels.

        A cancelled run is recorded as failed "interrupted" by `sync_tenant` itself.
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
