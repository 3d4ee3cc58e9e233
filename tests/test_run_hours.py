"""The hourly rollup `syncd.run_hours` says what `syncd.runs` says, whichever way runs end:
succeeded, partial, failed, interrupted or abandoned, through real syncs and through
`store` directly, and after the migration fills it from a populated database.

The expected rollup is computed here in Python from the runs themselves, independently of
the SQL that keeps the table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import db, store
from syncd import simulator as sim
from syncd.status import RunStatus
from syncd.sync import sync_tenant
from tests.fixtures.helpers import tenant_for

Rollup = dict[tuple[datetime, int, str], tuple[int, int, float, float | None, int, int]]


def _expected(runs: Iterable[Any]) -> Rollup:
    """(hour, tenant id, status) -> (runs, runs timed, duration sum and max, pairs added and
    removed), from rows of (tenant id, status, started_at, finished_at, added, removed)."""
    found: dict[tuple[datetime, int, str], list[Any]] = {}
    for tenant_id, status, started_at, finished_at, added, removed in runs:
        if status == "running":
            continue
        hour = datetime.fromtimestamp(started_at.timestamp() // 3600 * 3600, UTC)
        found.setdefault((hour, tenant_id, status), []).append(
            (
                None if finished_at is None else (finished_at - started_at).total_seconds(),
                added,
                removed,
            )
        )
    rollup: Rollup = {}
    for key, rows in found.items():
        durations = [duration for duration, _, _ in rows if duration is not None]
        rollup[key] = (
            len(rows),
            len(durations),
            round(sum(durations), 6),
            None if not durations else round(max(durations), 6),
            sum(added for _, added, _ in rows),
            sum(removed for _, _, removed in rows),
        )
    return rollup


async def _rollup_and_expected(engine: AsyncEngine) -> tuple[Rollup, Rollup]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            sa.text(
                "SELECT hour, tenant_id, status, runs, runs_timed, duration_sum_s, "
                "duration_max_s, pairs_added, pairs_removed FROM syncd.run_hours"
            )
        )
        rollup: Rollup = {
            (hour, tenant_id, status): (
                runs,
                timed,
                round(total, 6),
                None if longest is None else round(longest, 6),
                added,
                removed,
            )
            for hour, tenant_id, status, runs, timed, total, longest, added, removed in rows
        }
        runs = await connection.execute(
            sa.text(
                "SELECT tenant_id, status, started_at, finished_at, pairs_added, pairs_removed "
                "FROM syncd.runs"
            )
        )
        return rollup, _expected(runs)


async def test_every_way_a_run_ends_is_rolled_up_by_store(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        acme = await store.ensure_tenant(connection, "acme")
        globex = await store.ensure_tenant(connection, "globex")

    async def started(tenant_id: int, hours_ago: float = 0.0) -> store.Run:
        async with engine.begin() as connection:
            run = await store.start_run(connection, tenant_id, "t", "replica-a")
            # Moved back in time, so runs land in several hours (and a run started in one
            # hour that ends in the next counts in the hour it started).
            started_at = await connection.scalar(
                sa.text(
                    "UPDATE syncd.runs SET started_at = started_at - make_interval(secs => :s) "
                    "WHERE id = :id RETURNING started_at"
                ),
                {"s": hours_ago * 3600, "id": run.id},
            )
        return store.Run(run.id, tenant_id, run.tenant, started_at)

    def totals(status: RunStatus, added: int, removed: int) -> store.RunTotals:
        return store.RunTotals(
            status=status,
            pages_fetched=3,
            pairs_seen=100,
            added=added,
            removed=removed,
            error=None if status is RunStatus.SUCCEEDED else "something",
            current_pairs=100,
            collections={},
            confirmed=status is RunStatus.SUCCEEDED,
        )

    for hours_ago, status, added, removed in [
        (3.0, RunStatus.SUCCEEDED, 100, 0),
        (3.0, RunStatus.SUCCEEDED, 2, 1),
        (3.0, RunStatus.PARTIAL, 5, 0),
        (0.5, RunStatus.SUCCEEDED, 0, 7),
    ]:
        run = await started(acme, hours_ago)
        async with engine.begin() as connection:
            await store.finish_run(connection, run, totals(status, added, removed))

    failed = await started(acme, 2.0)
    async with engine.begin() as connection:
        await store.fail_run(connection, failed.id, "HTTP 403", 1)
    # Failing a run that is no longer running changes nothing, twice over.
    async with engine.begin() as connection:
        await store.fail_run(connection, failed.id, "again", 1)

    # Two runs of globex left running in one hour, one in another, by processes that died:
    # the next run's start closes them together.
    async with engine.begin() as connection:
        for hours_ago in (5.0, 5.0, 1.0):
            await connection.execute(
                sa.text(
                    "INSERT INTO syncd.runs (tenant_id, started_at, status) "
                    "VALUES (:t, now() - make_interval(secs => :s), 'running')"
                ),
                {"t": globex, "s": hours_ago * 3600},
            )
        running = await store.start_run(connection, globex, "t", "replica-a")
    assert running.abandoned == 3  # the new run is not in the rollup until it ends

    rollup, expected = await _rollup_and_expected(engine)
    assert rollup == expected
    by_status: dict[str, int] = {}
    for (_, _, status), row in rollup.items():
        by_status[status] = by_status.get(status, 0) + row[0]
    assert by_status == {"succeeded": 3, "partial": 1, "failed": 4}
    async with engine.begin() as connection:
        await store.fail_run(connection, running.id, "interrupted", 0)
    rollup, expected = await _rollup_and_expected(engine)
    assert rollup == expected and sum(row[0] for row in rollup.values()) == 9


async def test_real_syncs_are_rolled_up(
    sim_state: sim.SimulatorState, simulator: str, engine: AsyncEngine
) -> None:
    tenant = tenant_for(sim_state.tenants["tenant-1"], simulator)
    assert (await sync_tenant(tenant, engine)).status == "succeeded"
    sim_state.churn("tenant-1", 0.05)
    assert (await sync_tenant(tenant, engine)).status == "succeeded"
    sim_state.inject(sim.Fault(kind="drift", tenant="tenant-1", times=None))
    drifting = tenant_for(sim_state.tenants["tenant-1"], simulator, max_concurrent_pages=1)
    assert (await sync_tenant(drifting, engine)).status == "partial"
    sim_state.clear_faults()
    sim_state.inject(sim.Fault(kind="403", tenant="tenant-1", times=None))
    assert (await sync_tenant(tenant, engine)).status == "failed"
    sim_state.clear_faults()
    # Interrupted: cancelled mid-run, recorded as failed.
    sim_state.inject(sim.Fault(kind="latency", tenant="tenant-1", delay_s=0.3, times=None))
    task = asyncio.create_task(sync_tenant(tenant, engine))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    sim_state.clear_faults()
    # Abandoned: a run left running by a process that died, closed by the next run.
    async with engine.begin() as connection:
        await connection.execute(
            sa.text(
                "INSERT INTO syncd.runs (tenant_id, started_at, status) "
                "SELECT id, now() - interval '2 hours', 'running' FROM syncd.tenants "
                "WHERE name = 'tenant-1'"
            )
        )
    assert (await sync_tenant(tenant, engine)).status == "succeeded"

    rollup, expected = await _rollup_and_expected(engine)
    assert rollup == expected
    statuses = {status for _, _, status in rollup}
    assert statuses == {"succeeded", "partial", "failed"}
    assert sum(row[0] for row in rollup.values()) == 7


async def test_the_migration_fills_the_rollup_from_the_runs_recorded(empty_db_url: str) -> None:
    async with db.open_engine(empty_db_url, pool_size=1) as engine:
        await db.migrate(engine, "0006")
        now = datetime.now(UTC)
        async with engine.begin() as connection:
            await connection.execute(
                sa.text("INSERT INTO syncd.tenants (name) VALUES ('acme'), ('globex')")
            )
            # Three days of runs every 7 minutes, of every status; some without a finish
            # time (as older rows may be), the last ones still running.
            await connection.execute(
                sa.text(
                    """
                    INSERT INTO syncd.runs (tenant_id, started_at, finished_at, status,
                                            pairs_added, pairs_removed)
                    SELECT t.id, CAST(:now AS timestamptz) - make_interval(mins => 7 * i),
                           CASE WHEN i % 11 = 0 THEN NULL
                                ELSE CAST(:now AS timestamptz)
                                     - make_interval(mins => 7 * i, secs => -(i % 13))
                           END,
                           CASE WHEN i < 2 THEN 'running' WHEN i % 5 = 0 THEN 'failed'
                                WHEN i % 7 = 0 THEN 'partial' ELSE 'succeeded' END,
                           i % 3, i % 2
                      FROM syncd.tenants t, generate_series(0, 3 * 24 * 60 / 7) i
                    """
                ),
                {"now": now},
            )
        await db.migrate(engine)
        rollup, expected = await _rollup_and_expected(engine)
        assert rollup == expected
        assert {status for _, _, status in rollup} == {"succeeded", "partial", "failed"}
        assert len({hour for hour, _, _ in rollup}) >= 72
