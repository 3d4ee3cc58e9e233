"""The snapshot sync engine against a real PostgreSQL and the simulator over real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from asyncpg import introspection
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import claims, config, db, schema, status, sync
from syncd import simulator as sim
from syncd.sync import SyncResult, sync_tenant
from tests.fixtures.fault_helpers import pairs_outside
from tests.fixtures.helpers import (
    SYNC_APPLICATION_NAME,
    current_pairs,
    expected_pairs,
    fetch_all,
    link_row_writes,
    tenant_for,
)


async def run_sync(
    state: sim.SimulatorState, url: str, engine: AsyncEngine, name: str = "tenant-1", **kw: object
) -> SyncResult:
    allow = bool(kw.pop("allow_mass_delete", False))
    tenant = tenant_for(state.tenants[name], url, **kw)
    return await sync_tenant(tenant, engine, allow_mass_delete=allow)


async def test_initial_sync_copies_the_snapshot_exactly(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    result = await run_sync(sim_state, simulator, sync_engine)
    wanted = expected_pairs(sim_state.tenants["tenant-1"])
    assert result.status == "succeeded", result.error
    assert result.added == len(wanted) == result.current_pairs == result.pairs_seen
    assert result.removed == 0 and result.error is None
    assert await current_pairs(engine, "tenant-1") == wanted
    runs = await fetch_all(
        engine,
        "SELECT status, pairs_added, pairs_removed, pairs_seen, pages_fetched, error, "
        "finished_at IS NOT NULL FROM syncd.sync_runs WHERE tenant = 'tenant-1'",
    )
    assert runs == [("succeeded", len(wanted), 0, len(wanted), result.pages_fetched, None, True)]
    status = await fetch_all(
        engine,
        "SELECT last_status, current_pairs, last_success_at IS NOT NULL "
        "FROM syncd.tenant_status WHERE tenant = 'tenant-1'",
    )
    assert status == [("succeeded", len(wanted), True)]
    # Every current pair was confirmed by this run, which started when the pairs appeared.
    confirmed = await fetch_all(
        engine,
        "SELECT DISTINCT first_seen_at = last_confirmed_at FROM syncd.job_links_current",
    )
    assert confirmed == [(True,)]


async def test_each_run_records_the_replica_that_ran_it(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    tenant = tenant_for(sim_state.tenants["tenant-1"], simulator)
    assert (await sync_tenant(tenant, sync_engine, replica="replica-a")).status == "succeeded"
    assert (await sync_tenant(tenant, sync_engine)).status == "succeeded"
    replicas = await fetch_all(engine, "SELECT replica FROM syncd.sync_runs ORDER BY id")
    assert replicas == [("replica-a",), (config.default_replica_name(),)]


async def test_add_remove_readd_keeps_two_intervals(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    tenant = sim_state.tenants["tenant-1"]
    assert (await run_sync(sim_state, simulator, sync_engine)).status == "succeeded"
    removed = sim_state.remove_pairs("tenant-1", 3)
    added = sim_state.add_pairs("tenant-1", 5)
    second = await run_sync(sim_state, simulator, sync_engine)
    assert (second.status, second.added, second.removed) == ("succeeded", 5, 3)
    assert await current_pairs(engine, "tenant-1") == expected_pairs(tenant)

    tenant.items.append(removed[0])
    sim_state.invalidate("tenant-1")
    third = await run_sync(sim_state, simulator, sync_engine)
    assert (third.status, third.added, third.removed) == ("succeeded", 1, 0)
    back = removed[0]
    intervals = await fetch_all(
        engine,
        "SELECT valid_to IS NULL, closed_run_id, opened_run_id FROM syncd.job_links_history "
        "WHERE job_uid = :job AND linked_job_uid = :linked ORDER BY valid_from",
        job=back["jobUid"],
        linked=back["linkedJobUid"],
    )
    assert [row[0] for row in intervals] == [False, True]
    assert intervals[0][1] == second.run_id and intervals[1][2] == third.run_id
    changes = await fetch_all(
        engine,
        "SELECT change, sync_run_id FROM syncd.job_link_changes "
        "WHERE job_uid = :job AND linked_job_uid = :linked ORDER BY changed_at, change",
        job=back["jobUid"],
        linked=back["linkedJobUid"],
    )
    first_run = intervals[0][2]
    assert changes == [("added", first_run), ("removed", second.run_id), ("added", third.run_id)]
    new_pair = added[0]
    assert await fetch_all(
        engine,
        "SELECT change FROM syncd.job_link_changes WHERE job_uid = :job AND linked_job_uid = :l",
        job=new_pair["jobUid"],
        l=new_pair["linkedJobUid"],
    ) == [("added",)]


async def test_noop_resync_writes_no_link_rows(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, engine: AsyncEngine
) -> None:
    async def sync_once() -> SyncResult:
        async with db.open_engine(db_url, application_name=SYNC_APPLICATION_NAME) as own:
            return await run_sync(sim_state, simulator, own)

    first = await sync_once()
    after_initial = await link_row_writes(engine)
    assert after_initial == first.added > 0  # the statistics do see the sync's writes

    sim_state.churn("tenant-1", 0.01)
    churned = await sync_once()
    after_churn = await link_row_writes(engine)
    assert after_churn - after_initial == churned.added + churned.removed > 0

    noop = await sync_once()
    assert (noop.status, noop.added, noop.removed) == ("succeeded", 0, 0)
    assert await link_row_writes(engine) == after_churn
    # The no-op run still confirms every pair: last_confirmed_at moved to its start.
    confirmed = await fetch_all(
        engine,
        "SELECT DISTINCT c.last_confirmed_at = r.started_at FROM syncd.job_links_current c "
        "JOIN syncd.sync_runs r ON r.id = :run",
        run=noop.run_id,
    )
    assert confirmed == [(True,)]


async def test_duplicates_count_once_and_unique_job_uid_distinguishes(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    tenant = sim_state.tenants["tenant-1"]
    base = {
        "jobUid": "11111111-1111-4111-8111-111111111111",
        "linkedJobUid": "22222222-2222-4222-8222-222222222222",
    }
    tenant.items.extend(
        [
            dict(base),
            dict(base),  # an exact duplicate: one pair
            {**base, "uniqueJobUid": "33333333-3333-4333-8333-333333333333"},
            {**base, "uniqueJobUid": "44444444-4444-4444-8444-444444444444"},
        ]
    )
    sim_state.invalidate("tenant-1")
    result = await run_sync(sim_state, simulator, sync_engine)
    assert result.status == "succeeded", result.error
    stored = await fetch_all(
        engine,
        "SELECT unique_job_uid::text FROM syncd.job_links_current WHERE job_uid = :job "
        "ORDER BY unique_job_uid NULLS FIRST",
        job=base["jobUid"],
    )
    assert stored == [
        (None,),
        ("33333333-3333-4333-8333-333333333333",),
        ("44444444-4444-4444-8444-444444444444",),
    ]
    assert result.current_pairs == len(expected_pairs(tenant))
    again = await run_sync(sim_state, simulator, sync_engine)
    assert (again.added, again.removed) == (0, 0)


async def test_failing_page_withholds_removals_and_spares_other_tenants(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    for name in ("tenant-1", "tenant-2"):
        assert (await run_sync(sim_state, simulator, sync_engine, name)).status == "succeeded"
    before_other = await current_pairs(engine, "tenant-2")
    before = await current_pairs(engine, "tenant-1")
    sim_state.remove_pairs("tenant-1", 5)
    new = sim_state.add_pairs("tenant-1", 2)
    sim_state.inject(sim.Fault(kind="520", tenant="tenant-1", offset=98, times=None))
    partial, other = await asyncio.gather(
        run_sync(sim_state, simulator, sync_engine),
        run_sync(sim_state, simulator, sync_engine, "tenant-2"),
    )
    assert partial.status == "partial"
    assert partial.error is not None
    assert "removals withheld" in partial.error and "tenant-1" in partial.error
    assert "offset 98" in partial.error
    assert partial.removed == 0
    stored = await current_pairs(engine, "tenant-1")
    assert before <= stored  # nothing removed
    # Pairs on the pages that did arrive were stored: every position but those only the
    # failed page (offset 98, 50 items: 99..146 are not shared with a neighbour) holds.
    on_good_pages = pairs_outside(sim_state.tenants["tenant-1"].items, 99, 147)
    assert on_good_pages <= stored
    new_pairs = {(p["jobUid"], p.get("uniqueJobUid"), p["linkedJobUid"]) for p in new}
    assert new_pairs & on_good_pages <= stored and len(stored) == len(before) + len(
        new_pairs & on_good_pages
    )
    assert other.status == "succeeded"
    assert await current_pairs(engine, "tenant-2") == before_other
    # The next run, with the fault gone, catches up exactly.
    sim_state.clear_faults()
    healed = await run_sync(sim_state, simulator, sync_engine)
    assert healed.status == "succeeded" and healed.removed == 5
    assert await current_pairs(engine, "tenant-1") == expected_pairs(sim_state.tenants["tenant-1"])


async def test_first_page_failure_fails_the_run_and_keeps_data(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    assert (await run_sync(sim_state, simulator, sync_engine)).status == "succeeded"
    before = await current_pairs(engine, "tenant-1")
    sim_state.inject(sim.Fault(kind="403", tenant="tenant-1", times=None))
    failed = await run_sync(sim_state, simulator, sync_engine)
    assert failed.status == "failed"
    assert failed.error is not None and "403" in failed.error and "tenant-1" in failed.error
    assert await current_pairs(engine, "tenant-1") == before
    rows = await fetch_all(
        engine,
        "SELECT status, error IS NOT NULL FROM syncd.sync_runs WHERE id = :id",
        id=failed.run_id,
    )
    assert rows == [("failed", True)]


async def test_drift_makes_the_snapshot_partial(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    assert (await run_sync(sim_state, simulator, sync_engine)).status == "succeeded"
    before = await current_pairs(engine, "tenant-1")
    # Every page served moves the collection (one pair out, one in); with one page in flight
    # the order of requests, and so the outcome, is deterministic for the seeded simulator.
    sim_state.inject(sim.Fault(kind="drift", tenant="tenant-1", times=None))
    drifted = await run_sync(sim_state, simulator, sync_engine, max_concurrent_pages=1)
    assert drifted.status == "partial"
    assert drifted.error is not None and "removals withheld" in drifted.error
    assert drifted.removed == 0
    assert before <= await current_pairs(engine, "tenant-1")


async def test_mass_delete_guard_and_override(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    assert (await run_sync(sim_state, simulator, sync_engine)).status == "succeeded"
    tenant = sim_state.tenants["tenant-1"]
    kept = tenant.items[:50]
    tenant.items[:] = kept
    sim_state.invalidate("tenant-1")
    guarded = await run_sync(sim_state, simulator, sync_engine)
    assert guarded.status == "partial" and guarded.removed == 0
    assert guarded.error is not None
    assert "mass-delete guard" in guarded.error
    assert "syncd sync --tenant tenant-1 --allow-mass-delete" in guarded.error
    assert len(await current_pairs(engine, "tenant-1")) > len(kept)

    allowed = await run_sync(sim_state, simulator, sync_engine, allow_mass_delete=True)
    assert allowed.status == "succeeded" and allowed.removed > 200
    assert await current_pairs(engine, "tenant-1") == expected_pairs(tenant)


async def test_empty_snapshot_is_always_guarded(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    tenant = sim_state.tenants["tenant-1"]
    tenant.items[:] = tenant.items[:3]
    sim_state.invalidate("tenant-1")
    assert (await run_sync(sim_state, simulator, sync_engine)).current_pairs == len(
        expected_pairs(tenant)
    )
    tenant.items.clear()
    sim_state.invalidate("tenant-1")
    guarded = await run_sync(sim_state, simulator, sync_engine)
    assert guarded.status == "partial"
    assert guarded.error is not None and "snapshot is empty" in guarded.error
    assert len(await current_pairs(engine, "tenant-1")) == 3


async def test_concurrent_syncs_of_one_tenant_never_double_apply(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, engine: AsyncEngine
) -> None:
    sim_state.inject(sim.Fault(kind="latency", tenant="tenant-1", delay_s=0.05, times=None))
    async with (
        db.open_engine(db_url) as first_engine,
        db.open_engine(db_url) as second_engine,
    ):
        results = await asyncio.gather(
            run_sync(sim_state, simulator, first_engine),
            run_sync(sim_state, simulator, second_engine),
        )
    statuses = sorted(result.status for result in results)
    assert statuses == ["skipped", "succeeded"]
    skipped = next(result for result in results if result.status == "skipped")
    assert skipped.error is not None and "busy" in skipped.error
    duplicates = await fetch_all(
        engine,
        "SELECT count(*) FROM (SELECT job_uid, unique_job_uid, linked_job_uid FROM "
        "syncd.job_links_current GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
    )
    assert duplicates == [(0,)]
    assert await current_pairs(engine, "tenant-1") == expected_pairs(sim_state.tenants["tenant-1"])


async def test_runs_left_running_are_closed_as_abandoned(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    assert (await run_sync(sim_state, simulator, sync_engine)).status == "succeeded"
    async with engine.begin() as connection:
        await connection.exec_driver_sql(
            "INSERT INTO syncd.runs (tenant_id, started_at, status) "
            "SELECT id, now(), 'running' FROM syncd.tenants WHERE name = 'tenant-1'"
        )
    assert (await run_sync(sim_state, simulator, sync_engine)).status == "succeeded"
    rows = await fetch_all(
        engine, "SELECT status, error FROM syncd.sync_runs WHERE status <> 'succeeded'"
    )
    assert len(rows) == 1 and rows[0][0] == "failed" and rows[0][1].startswith("abandoned")


async def test_cancellation_rolls_back_and_records_interrupted(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    sim_state.inject(sim.Fault(kind="latency", tenant="tenant-1", delay_s=0.3, times=None))
    task = asyncio.create_task(run_sync(sim_state, simulator, sync_engine))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rows = await fetch_all(engine, "SELECT status, error FROM syncd.sync_runs")
    assert rows == [("failed", "interrupted: syncd was stopped")]
    assert await current_pairs(engine, "tenant-1") == set()


TS = "timestamp with time zone"
VIEW_COLUMNS = {
    "job_links_current": [
        ("tenant", "text"),
        ("job_uid", "uuid"),
        ("unique_job_uid", "uuid"),
        ("linked_job_uid", "uuid"),
        ("first_seen_at", TS),
        ("last_confirmed_at", TS),
        ("copy_mode", "text"),
    ],
    "job_links_history": [
        ("tenant", "text"),
        ("job_uid", "uuid"),
        ("unique_job_uid", "uuid"),
        ("linked_job_uid", "uuid"),
        ("valid_from", TS),
        ("valid_to", TS),
        ("opened_run_id", "bigint"),
        ("closed_run_id", "bigint"),
        ("copy_mode", "text"),
    ],
    "job_link_changes": [
        ("tenant", "text"),
        ("job_uid", "uuid"),
        ("unique_job_uid", "uuid"),
        ("linked_job_uid", "uuid"),
        ("change", "text"),
        ("changed_at", TS),
        ("sync_run_id", "bigint"),
        ("copy_mode", "text"),
    ],
    "sync_runs": [
        ("id", "bigint"),
        ("tenant", "text"),
        ("started_at", TS),
        ("finished_at", TS),
        ("status", "text"),
        ("pages_fetched", "integer"),
        ("pairs_seen", "integer"),
        ("pairs_added", "integer"),
        ("pairs_removed", "integer"),
        ("error", "text"),
        ("collections", "jsonb"),
        ("replica", "text"),
    ],
    "tenant_status": [
        ("tenant", "text"),
        ("last_run_at", TS),
        ("last_status", "text"),
        ("last_success_at", TS),
        ("current_pairs", "bigint"),
    ],
    "jobs_current": [
        ("tenant", "text"),
        ("job_uid", "uuid"),
        ("unique_job_uid", "uuid"),
        ("name", "text"),
        ("type", "text"),
        ("description", "text"),
        ("backup_server_uid", "uuid"),
        ("organization_uid", "uuid"),
        ("mapped_organization_uid", "uuid"),
        ("is_enabled", "boolean"),
        ("status", "text"),
        ("last_run_at", TS),
        ("last_end_at", TS),
        ("first_seen_at", TS),
    ],
    "jobs_history": [
        ("tenant", "text"),
        ("job_uid", "uuid"),
        ("unique_job_uid", "uuid"),
        ("name", "text"),
        ("type", "text"),
        ("description", "text"),
        ("backup_server_uid", "uuid"),
        ("organization_uid", "uuid"),
        ("mapped_organization_uid", "uuid"),
        ("is_enabled", "boolean"),
        ("valid_from", TS),
        ("valid_to", TS),
    ],
    "backup_servers_current": [
        ("tenant", "text"),
        ("backup_server_uid", "uuid"),
        ("name", "text"),
        ("version", "text"),
        ("organization_uid", "uuid"),
    ],
    "organizations_current": [
        ("tenant", "text"),
        ("organization_uid", "uuid"),
        ("name", "text"),
        ("alias", "text"),
        ("type", "text"),
    ],
    "job_links_named": [
        ("tenant", "text"),
        ("copy_mode", "text"),
        ("copy_job_uid", "uuid"),
        ("copy_job_name", "text"),
        ("source_job_uid", "uuid"),
        ("source_job_name", "text"),
        ("source_job_type", "text"),
        ("backup_server_name", "text"),
        ("organization_name", "text"),
    ],
    "unprotected_jobs": [
        ("tenant", "text"),
        ("job_uid", "uuid"),
        ("name", "text"),
        ("type", "text"),
        ("backup_server_name", "text"),
        ("organization_name", "text"),
    ],
}


async def test_reporting_views_have_the_contract_columns(engine: AsyncEngine) -> None:
    assert set(VIEW_COLUMNS) == set(schema.REPORTING_VIEWS)
    for view, columns in VIEW_COLUMNS.items():
        found = await fetch_all(
            engine,
            "SELECT column_name::text, data_type::text FROM information_schema.columns "
            "WHERE table_schema = 'syncd' AND table_name = :view ORDER BY ordinal_position",
            view=view,
        )
        assert found == columns, view


async def test_tenants_of_one_server_share_its_connections(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    # One run after another: each reuses the keep-alive connections of the runs before it
    # rather than opening its own (a thousand small tenants paid a connect per request slot).
    tenants = [
        tenant_for(sim_state.tenants[name], simulator, max_concurrent_pages=2)
        for name in sorted(sim_state.tenants)
    ]
    assert len(tenants) >= 3
    results = await sync.sync_tenants(tenants, sync_engine, max_concurrent_tenants=1)
    assert {result.status for result in results} == {status.RunStatus.SUCCEEDED}
    peers = {record.peer for record in sim_state.request_log}
    assert None not in peers
    assert len(sim_state.request_log) > 3 * len(peers)
    assert len(peers) <= 2  # the page slots of one run at a time (API keys: no token calls)


async def test_staging_is_empty_once_the_run_ends(
    sim_state: sim.SimulatorState, simulator: str, db_url: str
) -> None:
    # Staging lives as long as the pooled connection; nothing empties it but the end of the
    # run's transaction, so the connection's next run starts from empty tables.
    async with db.open_engine(db_url, pool_size=1) as engine:
        result = await run_sync(sim_state, simulator, engine)
        assert result.status == "succeeded" and result.added
        async with engine.connect() as connection:
            staged = await connection.scalar(sa.text("SELECT count(*) FROM pg_temp.syncd_staging"))
        assert staged == 0


# The query asyncpg runs to look up types it has no codec for (which one: by server version).
TYPE_LOOKUPS = (introspection.INTRO_LOOKUP_TYPES, introspection.INTRO_LOOKUP_TYPES_13)


async def test_runs_on_new_connections_need_no_type_lookups(
    sim_state: sim.SimulatorState, simulator: str, db_url: str
) -> None:
    # asyncpg looks up, on each new connection, the layout of any type it has no codec for
    # (up to three round trips, one of them a costly catalog query); `syncd sync` opens its
    # connections as it starts, so its runs must read and write only types the driver knows.
    # asyncpg's query logger sees its lookups and the statements sent unprepared (BEGIN,
    # COMMIT), not the prepared ones.
    queries: list[str] = []

    def log_queries(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(
            lambda logged: queries.append(logged.query)
        )

    tenant = tenant_for(sim_state.tenants["tenant-1"], simulator)
    async with db.open_engine(db_url) as engine:
        sa.event.listen(engine.sync_engine.pool, "connect", log_queries)
        # As `syncd sync` runs it: claimed, run, released. The second run reads the first
        # one's confirmed snapshots.
        for _ in range(2):
            result = await sync.sync_now(tenant, engine, replica=claims.Replica("cli", 4.0))
            assert result.status is status.RunStatus.SUCCEEDED
    assert queries, "the query logger saw nothing: the test would pass vacuously"
    lookups = [query for query in queries if query in TYPE_LOOKUPS]
    assert lookups == []
