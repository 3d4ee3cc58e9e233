"""Claims and due times: the decisions as pure functions, the SQL against a real PostgreSQL.

Time is the subject here, so no test waits for it: the pure functions take the database's
"now" as an argument, and the database tests move a row's times back instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import claims, config, db, store, sync
from syncd import simulator as sim
from syncd.claims import Ended, Outcome
from syncd.status import RunStatus
from tests.fixtures.helpers import fetch_all, tenant_for

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def _settings(**values: object) -> config.SyncSettings:
    return config.SyncSettings.model_validate(values)


def _tenant(name: str = "t1", **settings: object) -> config.Tenant:
    return config.Tenant(
        name=name,
        url="https://vspc.example.com",
        auth=config.ApiKeyAuth(SecretStr(f"key-of-{name}")),
        verify_tls=True,
        ca_file=None,
        settings=_settings(**settings),
    )


def _look(
    outcome: Outcome = Outcome.WON,
    *,
    due_at: datetime = NOW,
    now: datetime = NOW,
    failures: int = 0,
    claimed_at: datetime | None = None,
    claimed_until: datetime | None = None,
) -> claims.Look:
    return claims.Look(
        tenant="t1",
        tenant_id=1,
        outcome=outcome,
        due_at=due_at,
        failures=failures,
        claimed_by=None if claimed_at is None else "other",
        claimed_at=claimed_at,
        claimed_until=claimed_until,
        db_now=now,
        monotonic_s=100.0,
    )


# --- decisions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "factor"), [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 4.0), (1000, 4.0)]
)
def test_backoff_keeps_the_schedule_once_then_doubles_up_to_the_cap(
    failures: int, factor: float
) -> None:
    assert claims.failure_backoff_factor(failures, max_factor=4.0) == factor


def test_backoff_cap_below_two_periods_is_honoured() -> None:
    assert claims.failure_backoff_factor(5, max_factor=1.5) == 1.5
    assert claims.failure_backoff_factor(5, max_factor=1.0) == 1.0


def test_intervals_run_start_to_start_from_the_due_time_without_drift() -> None:
    every_15m = _settings(interval="15m")

    def due(due_at: datetime, started_at: datetime) -> datetime:
        return claims.regular_due(every_15m, due_at=due_at, started_at=started_at, ended_at=NOW)

    # Started late (any replica's timer fires a little after the due time): the rhythm
    # stays, however long the run took.
    assert due(NOW, NOW + timedelta(seconds=40)) == NOW + 15 * MINUTE
    # More than one interval late (every replica was down): a new rhythm from the start.
    assert due(NOW, NOW + 20 * MINUTE) == NOW + 35 * MINUTE
    # Run before it was due (`syncd sync`): the due time moves to one interval after it.
    assert due(NOW + 10 * MINUTE, NOW) == NOW + 15 * MINUTE


def test_cron_is_due_at_the_first_tick_after_the_run() -> None:
    quarterly = _settings(cron="*/15 * * * *")
    ticks = [claims.next_tick(quarterly, NOW + k * MINUTE) for k in (0, 1)]
    assert ticks[0] == NOW and ticks[1] - ticks[0] == 15 * MINUTE
    after = claims.regular_due(quarterly, due_at=NOW, started_at=NOW, ended_at=NOW + MINUTE)
    assert after == ticks[1]
    assert claims.period_s(quarterly, NOW) == 900.0


def test_next_due_resets_counts_and_backs_off_failures() -> None:
    every_minute = _settings(interval="1m")
    ended_at = NOW + timedelta(seconds=10)

    def after(how: Ended, failures: int) -> tuple[datetime, int]:
        return claims.next_due(
            _look(failures=failures), every_minute, how, ended_at=ended_at, max_backoff_factor=4
        )

    assert after(Ended.OK, 3) == (NOW + MINUTE, 0)
    # The first failure keeps the schedule; the second waits two periods from the end.
    assert after(Ended.TENANT_FAILED, 0) == (NOW + MINUTE, 1)
    assert after(Ended.TENANT_FAILED, 1) == (ended_at + 2 * MINUTE, 2)
    assert after(Ended.TENANT_FAILED, 7) == (ended_at + 4 * MINUTE, 8)
    # The database's failure is not the tenant's: neither counted nor backed off.
    assert after(Ended.DATABASE_FAILED, 2) == (NOW + MINUTE, 2)
    # Busy or interrupted: nothing happened, the tenant stays due.
    assert after(Ended.NOT_RUN, 2) == (NOW, 2)


def test_a_failing_cron_tenant_backs_off_to_a_tick() -> None:
    quarterly = _settings(cron="*/15 * * * *")
    due, failures = claims.next_due(
        _look(failures=1), quarterly, Ended.TENANT_FAILED, ended_at=NOW, max_backoff_factor=4
    )
    assert (due, failures) == (NOW + 30 * MINUTE, 2)


def test_what_a_run_result_means_for_the_schedule() -> None:
    assert claims.ended(RunStatus.SUCCEEDED, database_failure=False) is Ended.OK
    assert claims.ended(RunStatus.PARTIAL, database_failure=False) is Ended.OK
    assert claims.ended(RunStatus.FAILED, database_failure=False) is Ended.TENANT_FAILED
    assert claims.ended(RunStatus.FAILED, database_failure=True) is Ended.DATABASE_FAILED
    assert claims.ended(RunStatus.SKIPPED, database_failure=False) is Ended.NOT_RUN
    interrupted = claims.ended(RunStatus.FAILED, database_failure=False, interrupted=True)
    assert interrupted is Ended.NOT_RUN


def test_a_replica_that_lost_looks_again_when_the_tenant_should_be_due() -> None:
    every_minute = _settings(interval="1m")

    def look_again(look: claims.Look) -> float:
        return claims.next_look_s(look, every_minute)

    # Not due: at the due time, but at least once a period.
    assert look_again(_look(Outcome.NOT_DUE, due_at=NOW + 20 * timedelta(seconds=1))) == 20.0
    assert look_again(_look(Outcome.NOT_DUE, due_at=NOW + 4 * MINUTE)) == 60.0
    # Taken 5 s after it was due: when the holder will have made it due again.
    taken = _look(
        Outcome.TAKEN,
        now=NOW + timedelta(seconds=8),
        claimed_at=NOW + timedelta(seconds=5),
        claimed_until=NOW + timedelta(hours=1),
    )
    assert look_again(taken) == 52.0
    # Taken by a run longer than its interval: when its claim expires, at most a period on,
    # and never in a tight loop.
    overrun = _look(
        Outcome.TAKEN,
        now=NOW + timedelta(seconds=90),
        claimed_at=NOW,
        claimed_until=NOW + timedelta(seconds=100),
    )
    assert look_again(overrun) == 10.0
    dead = _look(
        Outcome.TAKEN,
        now=NOW + timedelta(seconds=90),
        claimed_at=NOW,
        claimed_until=NOW + timedelta(seconds=90.5),
    )
    assert look_again(dead) == 60.0 * claims.LOOK_FLOOR_FRACTION


# --- the database --------------------------------------------------------------------------


async def _claim(
    engine: AsyncEngine, replica: str, tenant: config.Tenant | None = None, **options: bool
) -> claims.Look:
    return await claims.claim(engine, tenant or _tenant(), replica, **options)


async def _release(
    engine: AsyncEngine, look: claims.Look, replica: str, how: Ended = Ended.OK
) -> claims.Released:
    return await claims.release(
        engine,
        look,
        claims.Replica(replica, 4.0),
        _tenant().settings,
        how,
        ended_monotonic_s=look.monotonic_s + 1.0,
    )


async def _shift(engine: AsyncEngine, column: str, by: timedelta) -> None:
    """Moves a schedule time of every tenant (instead of waiting for the clock to)."""
    async with engine.begin() as connection:
        await connection.exec_driver_sql(
            f"UPDATE syncd.schedule SET {column} = {column} + interval '{by.total_seconds()} s'"
        )


async def test_one_replica_claims_a_due_tenant_and_the_others_find_it_taken(
    engine: AsyncEngine,
) -> None:
    first = await _claim(engine, "a")
    assert first.outcome is Outcome.WON
    rows = await fetch_all(
        engine,
        "SELECT t.name, s.claimed_by, s.claimed_until - s.claimed_at, s.failures "
        "FROM syncd.schedule s JOIN syncd.tenants t ON t.id = s.tenant_id",
    )
    assert rows == [("t1", "a", timedelta(hours=1), 0)]  # run_timeout's default
    second = await _claim(engine, "b")
    assert (second.outcome, second.claimed_by) == (Outcome.TAKEN, "a")

    released = await _release(engine, first, "a")
    assert released.released and released.due_at == first.due_at + timedelta(minutes=15)
    later = await _claim(engine, "b")
    assert (later.outcome, later.due_at, later.claimed_by) == (
        Outcome.NOT_DUE,
        released.due_at,
        None,
    )
    # The database's clock moves on: due again, and b wins.
    await _shift(engine, "due_at", -timedelta(minutes=15))
    assert (await _claim(engine, "b")).outcome is Outcome.WON


@contextlib.asynccontextmanager
async def _engines(url: str, count: int) -> AsyncIterator[list[AsyncEngine]]:
    """`count` engines of their own on `url`, as `count` replicas would have."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(db.open_engine(url, pool_size=1)) for _ in range(count)
        ]


async def test_exactly_one_of_many_simultaneous_claims_wins(db_url: str) -> None:
    replicas = [f"r{index}" for index in range(6)]
    async with _engines(db_url, len(replicas)) as engines:
        for _ in range(5):
            looks = await asyncio.gather(
                *(_claim(engine, name) for engine, name in zip(engines, replicas, strict=True))
            )
            winners = [look for look in looks if look.outcome is Outcome.WON]
            assert len(winners) == 1, looks
            assert {look.outcome for look in looks if look not in winners} == {Outcome.TAKEN}
            winner = replicas[looks.index(winners[0])]
            await _release(engines[0], winners[0], winner)
            await _shift(engines[0], "due_at", -timedelta(minutes=15))


async def test_a_dead_replicas_claim_expires_after_the_run_timeout(engine: AsyncEngine) -> None:
    tenant = _tenant(run_timeout="10s")
    dead = await _claim(engine, "dead", tenant)
    assert dead.outcome is Outcome.WON
    assert (await _claim(engine, "alive", tenant)).outcome is Outcome.TAKEN
    await _shift(engine, "claimed_until", -timedelta(seconds=10))
    assert (await _claim(engine, "alive", tenant)).outcome is Outcome.WON
    # The dead replica's late release cannot clobber the new holder's claim.
    assert not (await _release(engine, dead, "dead")).released
    holder = await fetch_all(engine, "SELECT claimed_by FROM syncd.schedule")
    assert holder == [("alive",)]


async def test_the_claim_of_a_process_that_died_mid_run_is_taken_over_at_once(
    engine: AsyncEngine, db_url: str
) -> None:
    """A holder keeps the tenant's advisory lock while its run is `running`: a `running` run
    under a claim, with the lock free, was left by a dead process (no run_timeout wait)."""
    holder = await _claim(engine, "holder")
    async with engine.begin() as connection:
        await connection.exec_driver_sql(
            "INSERT INTO syncd.runs (tenant_id, started_at, status, replica) "
            f"VALUES ({holder.tenant_id}, now(), 'running', 'holder')"
        )
    alive = await asyncpg.connect(db_url)
    try:
        # Alive: it holds the tenant's lock (as sync_tenant does) while the run is running.
        locked = await alive.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", store.LOCK_NAMESPACE, holder.tenant_id
        )
        assert locked
        assert (await _claim(engine, "other")).outcome is Outcome.TAKEN
        # It dies: its session's locks go (here at once, rather than when the server
        # notices the closed connection).
        await alive.execute("SELECT pg_advisory_unlock_all()")
    finally:
        await alive.close()
    # The claim is free long before it expires.
    taken_over = await _claim(engine, "other")
    assert taken_over.outcome is Outcome.WON
    assert not (await _release(engine, holder, "holder")).released


async def test_a_replica_takes_back_its_own_claim_but_a_manual_sync_never_does(
    engine: AsyncEngine,
) -> None:
    assert (await _claim(engine, "a")).outcome is Outcome.WON
    # Its release failed (the database was away): it takes the claim back at its next look.
    assert (await _claim(engine, "a")).outcome is Outcome.WON
    manual = await _claim(engine, "a", regardless_of_due=True, reclaim_own=False)
    assert manual.outcome is Outcome.TAKEN


async def test_a_manual_claim_ignores_the_due_time_and_moves_it(engine: AsyncEngine) -> None:
    first = await _claim(engine, "daemon")
    await _release(engine, first, "daemon")
    assert (await _claim(engine, "daemon")).outcome is Outcome.NOT_DUE
    manual = await _claim(engine, "cli", regardless_of_due=True, reclaim_own=False)
    assert manual.outcome is Outcome.WON
    released = await _release(engine, manual, "cli")
    # Run ahead of its due time: the next one is an interval after this run's start.
    assert released.due_at == manual.db_now + timedelta(minutes=15)


async def test_failures_are_counted_whichever_replica_runs_the_tenant(
    engine: AsyncEngine,
) -> None:
    failures = []
    for replica in ("a", "b", "c", "a"):
        look = await _claim(engine, replica)
        assert look.outcome is Outcome.WON, look
        failures.append((await _release(engine, look, replica, Ended.TENANT_FAILED)).failures)
        await _shift(engine, "due_at", -timedelta(hours=2))
    assert failures == [1, 2, 3, 4]
    look = await _claim(engine, "b")
    assert (await _release(engine, look, "b", Ended.OK)).failures == 0


# --- `syncd sync`: a manual override -------------------------------------------------------


async def test_syncd_sync_runs_now_whatever_the_due_time_and_moves_it(
    sim_state: sim.SimulatorState, simulator: str, engine: AsyncEngine
) -> None:
    tenant = tenant_for(sim_state.tenants["tenant-1"], simulator, interval="15m")
    cli = claims.Replica("cli", 4.0)
    first = await sync.sync_now(tenant, engine, replica=cli)
    assert first.status is RunStatus.SUCCEEDED
    # Not due for 15 minutes: a daemon would not run it, `syncd sync` does, and moves it.
    assert (await claims.claim(engine, tenant, "daemon")).outcome is Outcome.NOT_DUE
    due_before = await _due_at(engine)
    second = await sync.sync_now(tenant, engine, replica=cli)
    assert second.status is RunStatus.SUCCEEDED
    query = "SELECT started_at FROM syncd.runs WHERE id = :id"
    started = (await fetch_all(engine, query, id=second.run_id))[0][0]
    assert due_before < await _due_at(engine)
    assert abs((await _due_at(engine) - started) - timedelta(minutes=15)) < timedelta(seconds=1)

    # A daemon holds the tenant: `syncd sync` skips it as busy and leaves its claim alone.
    await _shift(engine, "due_at", -timedelta(minutes=15))
    assert (await claims.claim(engine, tenant, "daemon")).outcome is Outcome.WON
    busy = await sync.sync_now(tenant, engine, replica=cli)
    assert (busy.status, busy.error) == (RunStatus.SKIPPED, sync.BUSY)
    runs = await fetch_all(engine, "SELECT replica FROM syncd.sync_runs ORDER BY id")
    assert runs == [("cli",), ("cli",)]
    assert await fetch_all(engine, "SELECT claimed_by FROM syncd.schedule") == [("daemon",)]


async def _due_at(engine: AsyncEngine) -> datetime:
    rows = await fetch_all(engine, "SELECT due_at FROM syncd.schedule")
    assert len(rows) == 1
    due: datetime = rows[0][0]
    return due
