"""A snapshot equal to the confirmed one is neither staged nor diffed; every other way of
applying a collection makes its confirmed snapshot current or forgets it, and so does any
change to the stored data that is not syncd's own apply.

The skip is observed through its one visible consequence: a row deleted in a transaction
that claims to be syncd's apply (`syncd.applying`, so the key stays) survives a run that
skipped, and is restored by one that diffed.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import simulator as sim
from syncd import store, sync
from syncd.sync import SyncResult, sync_tenant
from tests.fixtures.helpers import current_pairs, expected_pairs, fetch_all, tenant_for

TENANT = "tenant-1"
LINKS = "backup_copy_job_objects"


async def run(
    state: sim.SimulatorState, url: str, engine: AsyncEngine, **settings: object
) -> SyncResult:
    allow = bool(settings.pop("allow_mass_delete", False))
    tenant = tenant_for(state.tenants[TENANT], url, **settings)
    result = await sync_tenant(tenant, engine, allow_mass_delete=allow)
    return result


async def confirmed(engine: AsyncEngine) -> dict[str, tuple[int, int, int]]:
    """(total, items, run_id) of each confirmed collection of the tenant."""
    rows = await fetch_all(
        engine,
        "SELECT c.collection, c.total, c.items, c.run_id FROM syncd.confirmed_snapshots c "
        "JOIN syncd.tenants t ON t.id = c.tenant_id WHERE t.name = :t",
        t=TENANT,
    )
    return {name: (total, items, run_id) for name, total, items, run_id in rows}


async def delete_one_link_behind_syncds_back(engine: AsyncEngine, *, as_apply: bool = True) -> None:
    """Deletes one of the tenant's links; `as_apply`: in a transaction marked as syncd's own
    apply, which keeps the confirmed snapshots (else the database forgets them)."""
    async with engine.begin() as connection:
        if as_apply:
            await connection.execute(sa.text("SELECT set_config('syncd.applying', 'on', true)"))
        await connection.execute(
            sa.text(
                "DELETE FROM syncd.links WHERE id = (SELECT min(l.id) FROM syncd.links l "
                "JOIN syncd.tenants t ON t.id = l.tenant_id WHERE t.name = :t)"
            ),
            {"t": TENANT},
        )


async def test_an_unchanged_snapshot_is_not_diffed_and_a_changed_one_is(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    wanted = expected_pairs(sim_state.tenants[TENANT])
    first = await run(sim_state, simulator, sync_engine)
    assert first.status == "succeeded", first.error
    assert (await confirmed(engine))[LINKS] == (300, len(wanted), first.run_id)

    await delete_one_link_behind_syncds_back(engine)
    skipped = await run(sim_state, simulator, sync_engine)
    assert (skipped.status, skipped.added, skipped.removed) == ("succeeded", 0, 0)
    # Counted from the confirmed snapshot, as a diff would have counted them.
    assert skipped.current_pairs == skipped.pairs_seen == len(wanted)
    assert skipped.collections[LINKS].seen == len(wanted)
    assert len(await current_pairs(engine, TENANT)) == len(wanted) - 1  # not diffed
    assert (await confirmed(engine))[LINKS][2] == first.run_id  # nothing rewritten

    # One pair more on the last page: every page arrives, the last differs, all are diffed.
    sim_state.tenants[TENANT].items.append(
        {
            "jobUid": "ffffffff-ffff-4fff-8fff-ffffffffffff",
            "linkedJobUid": "ffffffff-ffff-4fff-8fff-fffffffffff0",
        }
    )
    sim_state.invalidate(TENANT)
    changed = await run(sim_state, simulator, sync_engine)
    assert changed.status == "succeeded", changed.error
    assert (changed.added, changed.removed) == (2, 0)  # the new pair and the deleted one
    assert await current_pairs(engine, TENANT) == expected_pairs(sim_state.tenants[TENANT])
    assert (await confirmed(engine))[LINKS] == (301, len(wanted) + 1, changed.run_id)


async def test_a_change_on_any_page_stages_the_pages_held_before_it(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    assert (await run(sim_state, simulator, sync_engine)).status == "succeeded"
    items = sim_state.tenants[TENANT].items
    for position in (299, 150, 0):  # a late page, a middle one, the first
        items[position] = {
            **items[position],
            "linkedJobUid": f"{position:08d}-0000-4000-8000-{0:012d}",
        }
        sim_state.invalidate(TENANT)
        # One page in flight: pages arrive in offset order, all before the change held.
        result = await run(sim_state, simulator, sync_engine, max_concurrent_pages=1)
        assert (result.status, result.added, result.removed) == ("succeeded", 1, 1)
        assert await current_pairs(engine, TENANT) == expected_pairs(sim_state.tenants[TENANT])


async def test_a_snapshot_larger_than_the_hold_is_streamed_and_still_skipped(
    sim_state: sim.SimulatorState,
    simulator: str,
    sync_engine: AsyncEngine,
    engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sync, "HOLD_MAX_BYTES", 120 * 48)
    assert (await run(sim_state, simulator, sync_engine)).status == "succeeded"
    await delete_one_link_behind_syncds_back(engine)
    skipped = await run(sim_state, simulator, sync_engine)
    assert (skipped.status, skipped.added, skipped.removed) == ("succeeded", 0, 0)
    wanted = expected_pairs(sim_state.tenants[TENANT])
    assert len(await current_pairs(engine, TENANT)) == len(wanted) - 1
    sim_state.churn(TENANT, 0.05)
    churned = await run(sim_state, simulator, sync_engine)
    assert churned.status == "succeeded" and churned.added > 0 and churned.removed > 0
    assert await current_pairs(engine, TENANT) == expected_pairs(sim_state.tenants[TENANT])


async def test_a_page_size_change_diffs_in_full(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    assert (await run(sim_state, simulator, sync_engine)).status == "succeeded"
    await delete_one_link_behind_syncds_back(engine)
    again = await run(sim_state, simulator, sync_engine, page_size=60)
    assert (again.status, again.added, again.removed) == ("succeeded", 1, 0)
    assert await current_pairs(engine, TENANT) == expected_pairs(sim_state.tenants[TENANT])


async def test_an_incomplete_snapshot_forgets_the_confirmed_one(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    assert (await run(sim_state, simulator, sync_engine)).status == "succeeded"
    sim_state.inject(sim.Fault(kind="520", tenant=TENANT, offset=98, times=None))
    partial = await run(sim_state, simulator, sync_engine)
    assert partial.status == "partial"
    assert LINKS not in await confirmed(engine)

    sim_state.clear_faults()
    await delete_one_link_behind_syncds_back(engine)
    healed = await run(sim_state, simulator, sync_engine)
    assert (healed.status, healed.added) == ("succeeded", 1)  # diffed: nothing to compare to
    assert (await confirmed(engine))[LINKS][2] == healed.run_id


async def test_withheld_removals_forget_and_a_failed_run_keeps_the_confirmed_one(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    first = await run(sim_state, simulator, sync_engine)
    sim_state.inject(sim.Fault(kind="403", tenant=TENANT, times=None))
    assert (await run(sim_state, simulator, sync_engine)).status == "failed"
    assert (await confirmed(engine))[LINKS][2] == first.run_id  # nothing applied, kept

    sim_state.clear_faults()
    tenant = sim_state.tenants[TENANT]
    tenant.items[:] = tenant.items[:50]
    sim_state.invalidate(TENANT)
    guarded = await run(sim_state, simulator, sync_engine)
    assert guarded.status == "partial" and guarded.removed == 0
    assert LINKS not in await confirmed(engine)
    allowed = await run(sim_state, simulator, sync_engine, allow_mass_delete=True)
    assert allowed.status == "succeeded" and allowed.removed > 0
    assert (await confirmed(engine))[LINKS][:2] == (50, len(expected_pairs(tenant)))


async def test_catalog_collections_skip_alike_and_a_volatile_change_is_applied(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    assert (await run(sim_state, simulator, sync_engine)).status == "succeeded"
    every = await confirmed(engine)
    assert set(every) >= {"jobs", "backup_servers", "organizations"}
    again = await run(sim_state, simulator, sync_engine)
    assert again.status == "succeeded"
    assert await confirmed(engine) == every  # all unchanged: nothing rewritten

    job = sim_state.tenants[TENANT].jobs[0]
    sim_state.set_job_fields(TENANT, job["instanceUid"], status="Failed")
    refreshed = await run(sim_state, simulator, sync_engine)
    assert refreshed.status == "succeeded"
    status = await fetch_all(
        engine,
        "SELECT status FROM syncd.jobs_current WHERE tenant = :t AND job_uid = :uid",
        t=TENANT,
        uid=job["instanceUid"],
    )
    assert status == [("Failed",)]
    after = await confirmed(engine)
    assert after["jobs"][2] == refreshed.run_id
    assert after["organizations"] == every["organizations"]


async def test_a_noop_run_is_two_statements_in_two_transactions(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    assert (await run(sim_state, simulator, sync_engine)).status == "succeeded"
    seen: list[str] = []

    def statement(*args: object) -> None:
        seen.append(" ".join(str(args[2]).split())[:30])

    def transaction(name: str) -> Callable[..., None]:
        return lambda *args: seen.append(name)

    events = [("before_cursor_execute", statement)]
    events += [(name, transaction(name)) for name in ("begin", "commit", "savepoint")]
    for name, listener in events:
        event.listen(sync_engine.sync_engine, name, listener)
    try:
        noop = await run(sim_state, simulator, sync_engine)
    finally:
        for name, listener in events:
            event.remove(sync_engine.sync_engine, name, listener)
    assert noop.status == "succeeded" and (noop.added, noop.removed) == (0, 0)
    # Start the run (closing abandoned ones), finish it; the tenant's lock is taken and
    # released on the driver's connection, outside transactions.
    assert seen == [
        "begin",
        "WITH abandoned AS ( UPDATE syn",
        "commit",
        "begin",
        "WITH tenant AS ( UPDATE syncd.",
        "commit",
    ]


async def test_a_change_outside_the_apply_forgets_every_confirmed_snapshot(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    assert (await run(sim_state, simulator, sync_engine)).status == "succeeded"
    assert LINKS in await confirmed(engine)
    await delete_one_link_behind_syncds_back(engine, as_apply=False)  # a hand edit
    assert await confirmed(engine) == {}
    repaired = await run(sim_state, simulator, sync_engine)
    assert (repaired.status, repaired.added) == ("succeeded", 1)
    assert await current_pairs(engine, TENANT) == expected_pairs(sim_state.tenants[TENANT])
    assert LINKS in await confirmed(engine)

    async with engine.begin() as connection:  # a catalog edit, by a later migration say
        await connection.execute(sa.text("UPDATE syncd.catalog_items SET volatile = '{}'"))
    assert await confirmed(engine) == {}
    assert (await run(sim_state, simulator, sync_engine)).status == "succeeded"
    status = await fetch_all(
        engine, "SELECT count(*) FROM syncd.jobs_current WHERE status IS NOT NULL"
    )
    assert status[0][0] > 0  # the volatile fields came back


async def tenant_locks(engine: AsyncEngine) -> int:
    """Advisory locks on the tenant held by any session, syncd's namespace."""
    rows = await fetch_all(
        engine,
        "SELECT count(*) FROM pg_locks l JOIN syncd.tenants t ON l.objid = t.id "
        "WHERE l.locktype = 'advisory' AND l.classid = :namespace AND l.objsubid = 2 "
        "AND t.name = :t",
        namespace=store.LOCK_NAMESPACE,
        t=TENANT,
    )
    return int(rows[0][0])


async def test_no_run_leaves_the_tenant_locked(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    assert (await run(sim_state, simulator, sync_engine)).status == "succeeded"
    assert await tenant_locks(engine) == 0
    assert (await run(sim_state, simulator, sync_engine)).status == "succeeded"  # no-op
    assert await tenant_locks(engine) == 0
    sim_state.inject(sim.Fault(kind="403", tenant=TENANT, times=None))
    assert (await run(sim_state, simulator, sync_engine)).status == "failed"
    assert await tenant_locks(engine) == 0
