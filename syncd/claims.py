"""Who runs a tenant, and when it is next due: the replicas agree through PostgreSQL.

Every replica (`syncd run` process) keeps a local timer per tenant (`scheduler`), but a
timer only *asks*. `claim` is one conditional UPDATE of the tenant's `syncd.schedule` row:
it succeeds for one replica only, and only when the tenant is due and nobody else's claim
is alive. The winner runs the tenant; `release` then sets the next due time from the
winner's schedule and clears the claim. `syncd sync` claims regardless of the due time (a
manual override) but never takes a tenant another process holds.

A claim lasts at most the tenant's `[sync] run_timeout`. A replica that dies mid-run leaves
a run that the next claimant closes as abandoned; its claim is taken over as soon as its
database session is gone (a live holder keeps the tenant's advisory lock while its run is
`running`), and expires anyway after `run_timeout`. `sync.sync_tenant` keeps that advisory
lock as a second line of defence. The times that decide are the database's, so replicas
with skewed clocks agree; a replica only turns "due in 3.2 s" into a time of its own clock,
with a monotonic clock.

The decisions (next due time, failure backoff, when to look again) are pure functions at the
top; `claim` and `release` are the I/O.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import config, db, store
from syncd.status import RunStatus

if TYPE_CHECKING:
    from apscheduler.triggers.cron import CronTrigger

log = structlog.get_logger(__name__)

# A replica that did not win a tenant looks again when the winner should have finished, but
# never sooner than this fraction of the period (a run longer than its interval would
# otherwise be polled in a loop) and never later than one period: a replica that died
# without a claim, or a due time moved by hand, is noticed within one interval.
LOOK_FLOOR_FRACTION = 0.05


class Outcome(enum.StrEnum):
    """How a claim attempt ended (the `result` label of `syncd_claims_total`)."""

    WON = "won"
    NOT_DUE = "not_due"
    TAKEN = "taken"


class Ended(enum.StrEnum):
    """What a claimed run means for the tenant's schedule."""

    OK = "ok"  # succeeded or partial: the next due time, failures reset
    TENANT_FAILED = "tenant_failed"  # one failure more, backoff
    DATABASE_FAILED = "database_failed"  # not the tenant's fault: no backoff
    NOT_RUN = "not_run"  # busy (another process's lock) or interrupted: still due


@dataclass(frozen=True)
class Look:
    """What one claim attempt found; times are the database's clock."""

    tenant: str
    tenant_id: int
    outcome: Outcome
    due_at: datetime  # before this attempt
    failures: int
    claimed_by: str | None  # the holder of a live claim, when TAKEN
    claimed_at: datetime | None
    claimed_until: datetime | None
    db_now: datetime
    monotonic_s: float  # this process's monotonic clock at `db_now`, about

    def db_time(self, monotonic_s: float) -> datetime:
        """The database's clock at this process's monotonic instant `monotonic_s`."""
        return self.db_now + timedelta(seconds=monotonic_s - self.monotonic_s)


@dataclass(frozen=True)
class Replica:
    """The claimant: this process's `[daemon] replica_name` and its failure backoff cap."""

    name: str
    max_failure_backoff_factor: float

    @classmethod
    def of(cls, daemon: config.DaemonConfig) -> Replica:
        return cls(daemon.replica(), daemon.max_failure_backoff_factor)


@dataclass(frozen=True)
class Released:
    """What `release` wrote: the next due time (database clock) and the failure count."""

    due_at: datetime
    failures: int
    released: bool  # False: the claim had expired and another replica held the tenant


# --- decisions (pure) ----------------------------------------------------------------------


def ended(status: RunStatus, *, database_failure: bool, interrupted: bool = False) -> Ended:
    """How a run's result counts for the schedule."""
    if interrupted or status is RunStatus.SKIPPED:
        return Ended.NOT_RUN
    if database_failure:
        return Ended.DATABASE_FAILED
    if status is RunStatus.FAILED:
        return Ended.TENANT_FAILED
    return Ended.OK


def cron_trigger(settings: config.SyncSettings, *, jitter_s: float | None = None) -> CronTrigger:
    """The tenant's crontab as a trigger, in the host's local time zone (as crontab reads it)."""
    from apscheduler.triggers.cron import CronTrigger  # the daemon's, or a cron tenant's

    assert settings.cron is not None
    minute, hour, day, month, day_of_week = settings.cron.split()
    return CronTrigger(
        minute=minute, hour=hour, day=day, month=month, day_of_week=day_of_week, jitter=jitter_s
    )


def next_tick(settings: config.SyncSettings, at_or_after: datetime) -> datetime:
    """The first cron fire time at or after `at_or_after`."""
    fire: datetime | None = cron_trigger(settings).get_next_fire_time(None, at_or_after)
    assert fire is not None, "a valid crontab always fires again"
    return fire


def period_s(settings: config.SyncSettings, now: datetime) -> float:
    """The schedule's period: the interval, or the gap between the next two cron ticks."""
    if settings.cron is None:
        return settings.interval_s
    first = next_tick(settings, now)
    second = next_tick(settings, first + timedelta(seconds=1))
    return (second - first).total_seconds()


def failure_backoff_factor(consecutive_failures: int, max_factor: float) -> float:
    """How many periods to wait after `consecutive_failures` failed runs in a row.

    The first failure keeps the schedule (one period); each further one doubles the wait,
    up to `max_factor` periods.
    """
    if consecutive_failures <= 1:
        return 1.0
    return min(2.0 ** min(consecutive_failures - 1, 60), max_factor)


def regular_due(
    settings: config.SyncSettings,
    *,
    due_at: datetime,
    started_at: datetime,
    ended_at: datetime,
) -> datetime:
    """The next due time after a run that started at `started_at` when due at `due_at`.

    Intervals are measured start to start, from the due time, so a tenant keeps its rhythm
    however late each run begins; a tenant more than one interval late (or run before it was
    due, by hand) starts a new rhythm at the run's start. Cron: the first tick after the end.
    """
    if settings.cron is not None:
        return next_tick(settings, ended_at + timedelta(microseconds=1))
    interval = timedelta(seconds=settings.interval_s)
    if started_at - interval < due_at <= started_at:
        return due_at + interval
    return started_at + interval


def next_due(
    look: Look,
    settings: config.SyncSettings,
    how: Ended,
    *,
    ended_at: datetime,
    max_backoff_factor: float,
) -> tuple[datetime, int]:
    """(next due time, failures in a row) after the run `look` claimed ended `how`.

    A tenant that failed twice or more in a row waits 2, 4, ... periods from the run's end
    (at most `max_backoff_factor`), whichever replica runs it next: the count lives in the
    database. A run that did not happen leaves the tenant due.
    """
    if how is Ended.NOT_RUN:
        return look.due_at, look.failures
    failures = {
        Ended.OK: 0,
        Ended.TENANT_FAILED: look.failures + 1,
        Ended.DATABASE_FAILED: look.failures,
    }[how]
    due = regular_due(settings, due_at=look.due_at, started_at=look.db_now, ended_at=ended_at)
    if how is Ended.TENANT_FAILED:
        factor = failure_backoff_factor(failures, max_backoff_factor)
        earliest = ended_at + timedelta(seconds=period_s(settings, ended_at) * factor)
        if factor > 1.0 and due < earliest:
            # Cron tenants stay on their ticks: the first one after the backoff.
            due = earliest if settings.cron is None else next_tick(settings, earliest)
    return due, failures


def bound_look_s(delay_s: float, period: float) -> float:
    """`delay_s` within [LOOK_FLOOR_FRACTION * period, period]."""
    return min(max(delay_s, LOOK_FLOOR_FRACTION * period), period)


def next_look_s(look: Look, settings: config.SyncSettings) -> float:
    """Seconds until a replica that did not win `look` should try again.

    Not due: at the due time. Taken: when the holder should have set the next due time, or,
    if that has passed (a run longer than its interval), when its claim expires.
    """
    period = period_s(settings, look.db_now)
    if look.outcome is Outcome.NOT_DUE:
        target = look.due_at
    else:
        expected = regular_due(
            settings,
            due_at=look.due_at,
            started_at=look.claimed_at or look.db_now,
            ended_at=look.db_now,
        )
        if expected > look.db_now:
            target = expected
        else:
            target = look.claimed_until or look.db_now + timedelta(seconds=period)
    return bound_look_s((target - look.db_now).total_seconds(), period)


# --- the database --------------------------------------------------------------------------


async def claim(
    engine: AsyncEngine,
    tenant: config.Tenant,
    replica: str,
    *,
    regardless_of_due: bool = False,
    reclaim_own: bool = True,
) -> Look:
    """Tries to claim `tenant` for `replica`; the tenant's rows are created on first sight.

    `reclaim_own` (the daemon) takes back a claim this replica still holds because its
    release failed; `syncd sync` passes False, so it never takes a daemon's claim even under
    a shared `replica_name`. Raises `errors.DatabaseError` when the database fails.
    """
    sent_s = 0.0
    with db.database_errors("cannot claim the tenant"):
        async with db.autocommit(engine) as connection:

            async def attempt() -> store.ClaimRow | None:
                nonlocal sent_s
                # The statement's timestamp is the database's clock when it was sent, about.
                sent_s = time.monotonic()
                return await store.try_claim(
                    connection,
                    tenant.name,
                    replica,
                    run_timeout_s=tenant.settings.run_timeout_s,
                    regardless_of_due=regardless_of_due,
                    reclaim_own=reclaim_own,
                )

            row = await attempt()
            if row is None:
                await store.add_schedule(connection, tenant.name)
                row = await attempt()
            assert row is not None, "add_schedule gave the tenant its row"
    if row.won:
        outcome = Outcome.WON
    elif row.due_at > row.now and not regardless_of_due:
        outcome = Outcome.NOT_DUE
    else:
        # A live claim of another process, or the claim of one that won the race just now.
        outcome = Outcome.TAKEN
    live_claim = row.claimed_until is not None and row.claimed_until > row.now
    return Look(
        tenant=tenant.name,
        tenant_id=row.tenant_id,
        outcome=outcome,
        due_at=row.due_at,
        failures=row.failures,
        claimed_by=row.claimed_by if live_claim and not row.won else None,
        claimed_at=row.claimed_at if live_claim and not row.won else None,
        claimed_until=row.claimed_until if live_claim and not row.won else None,
        db_now=row.now,
        monotonic_s=sent_s,
    )


async def release(
    engine: AsyncEngine,
    look: Look,
    replica: Replica,
    settings: config.SyncSettings,
    how: Ended,
    *,
    ended_monotonic_s: float,
) -> Released:
    """Sets the next due time after the run `look` claimed, and clears the claim.

    The schedule of the replica that releases decides the next due time: during a rolling
    config change, the last replica to finish a run wins. Raises `errors.DatabaseError`
    when the database fails (the claim then expires, or this replica takes it back).
    """
    assert look.outcome is Outcome.WON
    ended_at = look.db_time(ended_monotonic_s)
    due_at, failures = next_due(
        look,
        settings,
        how,
        ended_at=ended_at,
        max_backoff_factor=replica.max_failure_backoff_factor,
    )
    with db.database_errors("cannot release the tenant's claim"):
        async with db.autocommit(engine) as connection:
            released = await store.release_claim(
                connection,
                look.tenant_id,
                replica.name,
                look.db_now,
                due_at=due_at,
                failures=failures,
                schedule=schedule_text(settings),
            )
    if not released:
        log.warning(
            "claim expired before the run ended: another replica holds the tenant now",
            tenant=look.tenant,
        )
    return Released(due_at=due_at, failures=failures, released=released)


def schedule_text(settings: config.SyncSettings) -> str:
    """The tenant's schedule as people read it ("every 900s", "cron */15 * * * *")."""
    if settings.cron is not None:
        return f"cron {settings.cron}"
    return f"every {settings.interval_s:g}s"
