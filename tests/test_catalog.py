"""Both copy modes and the catalog, against the simulator and a real PostgreSQL.

Per collection: an exact copy after a complete sync, history on a rename, volatile fields
current-only, no data writes on a no-op, the mass-delete guard and incomplete snapshots, a
404 as `unavailable`. Then the two report views and the README's cookbook on a hand-built
dataset, and a database of the previous schema upgraded in place.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import collections, db, errors, metrics, ops, paging, store, sync
from syncd import simulator as sim
from syncd.collections import Status
from syncd.status import RunStatus
from syncd.sync import CollectionResult, SyncResult, sync_tenant
from tests.fixtures.fault_helpers import assert_history_sound
from tests.fixtures.helpers import (
    SYNC_APPLICATION_NAME,
    current_pairs,
    expected_pairs,
    fetch_all,
    row_writes,
    tenant_for,
)

TENANT = "tenant-1"
README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


@pytest.fixture
def sim_state() -> sim.SimulatorState:
    """Three tenants of 300 periodic and 60 immediate pairs, with their catalog (seed 1)."""
    dataset = sim.make_dataset(
        tenants=3, pairs_per_tenant=300, seed=1, immediate_pairs_per_tenant=60
    )
    return sim.SimulatorState(dataset, seed=1)


async def run_sync(
    state: sim.SimulatorState,
    url: str,
    engine: AsyncEngine,
    name: str = TENANT,
    *,
    allow_mass_delete: bool = False,
    **settings: Any,
) -> SyncResult:
    tenant = tenant_for(state.tenants[name], url, **settings)
    return await sync_tenant(tenant, engine, allow_mass_delete=allow_mass_delete)


def statuses(result: SyncResult) -> dict[str, str]:
    return {name: str(outcome.status) for name, outcome in result.collections.items()}


# --- what the simulator holds, as the views should show it ------------------------------


def _uuid(value: Any) -> str | None:
    return None if value is None else str(value)


def expected_jobs(tenant: sim.SimTenant) -> set[tuple[Any, ...]]:
    return {
        (
            job["instanceUid"],
            job.get("uniqueUid"),
            job.get("name"),
            job.get("type"),
            job.get("description"),
            job.get("backupServerUid"),
            job.get("organizationUid"),
            job.get("mappedOrganizationUid"),
            job.get("isEnabled"),
            job.get("status"),
            job.get("lastRun"),
            job.get("lastEndTime"),
        )
        for job in tenant.jobs
    }


async def stored_jobs(engine: AsyncEngine, tenant: str) -> set[tuple[Any, ...]]:
    rows = await fetch_all(
        engine,
        "SELECT job_uid, unique_job_uid, name, type, description, backup_server_uid, "
        "organization_uid, mapped_organization_uid, is_enabled, status, last_run_at, "
        "last_end_at FROM syncd.jobs_current WHERE tenant = :tenant",
        tenant=tenant,
    )
    return {
        (
            *(_uuid(value) for value in row[:2]),
            *row[2:5],
            *(_uuid(value) for value in row[5:8]),
            row[8],
            row[9],
            None if row[10] is None else row[10].isoformat(),
            None if row[11] is None else row[11].isoformat(),
        )
        for row in rows
    }


async def stored_pairs(engine: AsyncEngine, tenant: str, mode: str) -> set[tuple[Any, ...]]:
    rows = await fetch_all(
        engine,
        "SELECT job_uid::text, unique_job_uid::text, linked_job_uid::text "
        "FROM syncd.job_links_current WHERE tenant = :tenant AND copy_mode = :mode",
        tenant=tenant,
        mode=mode,
    )
    return set(rows)


def pairs_of(items: Sequence[dict[str, str]]) -> set[tuple[Any, ...]]:
    return {(i["jobUid"], i.get("uniqueJobUid"), i["linkedJobUid"]) for i in items}


async def catalog_versions(engine: AsyncEngine, uid: str) -> list[tuple[Any, ...]]:
    return await fetch_all(
        engine,
        "SELECT name, valid_from, valid_to FROM syncd.jobs_history "
        "WHERE job_uid = :uid ORDER BY valid_from",
        uid=uid,
    )


async def data_writes(engine: AsyncEngine) -> dict[str, int]:
    """Rows written to the data tables so far (the syncing engine must be disposed of)."""
    return await row_writes(engine, "links", "catalog_items")


# --- exact copies ---------------------------------------------------------------------------


async def test_a_complete_sync_copies_every_collection_exactly(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    result = await run_sync(sim_state, simulator, sync_engine)
    tenant = sim_state.tenants[TENANT]
    assert result.status == "succeeded", result.error
    assert statuses(result) == dict.fromkeys(collections.COLLECTIONS, "succeeded")
    assert await stored_pairs(engine, TENANT, "periodic") == pairs_of(tenant.items)
    assert await stored_pairs(engine, TENANT, "immediate") == pairs_of(tenant.immediate_items)
    assert result.current_pairs == result.pairs_seen == len(tenant.items) + 60
    assert result.added == result.current_pairs
    assert await stored_jobs(engine, TENANT) == expected_jobs(tenant)
    servers = await fetch_all(
        engine,
        "SELECT backup_server_uid::text, name, version, organization_uid::text "
        "FROM syncd.backup_servers_current WHERE tenant = :tenant",
        tenant=TENANT,
    )
    assert set(servers) == {
        (s["instanceUid"], s["name"], s["version"], s["organizationUid"])
        for s in tenant.backup_servers
    }
    organizations = await fetch_all(
        engine,
        "SELECT organization_uid::text, name, alias, type FROM syncd.organizations_current "
        "WHERE tenant = :tenant",
        tenant=TENANT,
    )
    assert set(organizations) == {
        (o["instanceUid"], o["name"], o["alias"], o["type"]) for o in tenant.organizations
    }
    # Personal data stays out: organizations keep name, alias and type, nothing else.
    assert any("email" in o and "phone" in o for o in tenant.organizations)
    kept = await fetch_all(
        engine,
        "SELECT DISTINCT jsonb_object_keys(attributes || volatile) FROM syncd.catalog_items "
        "WHERE collection = 'organizations'",
    )
    assert {key for (key,) in kept} == {"name", "alias", "type"}
    # Fields of no spec (lastDuration, processingRate, ...) are dropped as well.
    job_keys = await fetch_all(
        engine,
        "SELECT DISTINCT jsonb_object_keys(volatile) FROM syncd.catalog_items "
        "WHERE collection = 'jobs'",
    )
    assert {key for (key,) in job_keys} == {"status", "lastRun", "lastEndTime"}
    # Counted per collection in the run's row; pairs_* count both copy modes.
    run = await fetch_all(
        engine,
        "SELECT pairs_seen, pairs_added, collections FROM syncd.sync_runs WHERE id = :id",
        id=result.run_id,
    )
    pairs_seen, pairs_added, outcomes = run[0]
    assert pairs_seen == pairs_added == result.current_pairs
    assert outcomes["jobs"] == {
        "status": "succeeded",
        "pages": result.collections["jobs"].pages,
        "seen": len(tenant.jobs),
        "added": len(tenant.jobs),
        "removed": 0,
        "changed": 0,
        "error": None,
    }
    assert outcomes["immediate_copy_job_objects"]["seen"] == 60
    status = await fetch_all(
        engine, "SELECT current_pairs FROM syncd.tenant_status WHERE tenant = :t", t=TENANT
    )
    assert status == [(len(tenant.items) + 60,)]
    await assert_history_sound(engine)


async def test_a_rename_is_a_new_version_and_volatile_fields_are_current_only(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, engine: AsyncEngine
) -> None:
    async def sync_once() -> SyncResult:
        async with db.open_engine(db_url, application_name=SYNC_APPLICATION_NAME) as own:
            return await run_sync(sim_state, simulator, own)

    first = await sync_once()
    assert first.status == "succeeded", first.error
    tenant = sim_state.tenants[TENANT]
    copy_job = tenant.items[0]["jobUid"]
    before = await data_writes(engine)

    # Nothing changed: no data row written, for any collection.
    noop = await sync_once()
    assert noop.status == "succeeded"
    assert {(o.added, o.removed, o.changed) for o in noop.collections.values()} == {(0, 0, 0)}
    assert await data_writes(engine) == before

    # A session ran: status and times change in place, no new version.
    sim_state.set_job_fields(
        TENANT, copy_job, status="Failed", lastRun="2026-11-30T01:00:00.0000000+01:00"
    )
    volatile = await sync_once()
    assert volatile.collections["jobs"].changed == 0
    assert volatile.collections["jobs"].added == 0
    after_volatile = await data_writes(engine)
    assert after_volatile["catalog_items"] - before["catalog_items"] == 1  # one update
    assert after_volatile["links"] == before["links"]
    current = await fetch_all(
        engine,
        "SELECT status, last_run_at, first_seen_at FROM syncd.jobs_current WHERE job_uid = :uid",
        uid=copy_job,
    )
    assert current[0][0] == "Failed"
    assert current[0][1].isoformat() == "2026-11-30T00:00:00+00:00"
    assert len(await catalog_versions(engine, copy_job)) == 1

    # A rename: the old version closes, a new one opens, first_seen_at stays.
    old_name = sim_state.job(TENANT, copy_job)["name"]
    sim_state.rename_job(TENANT, copy_job, "Offsite daily")
    renamed = await sync_once()
    assert (renamed.collections["jobs"].changed, renamed.collections["jobs"].added) == (1, 0)
    after_rename = await data_writes(engine)
    assert after_rename["catalog_items"] - after_volatile["catalog_items"] == 2  # close, insert
    versions = await catalog_versions(engine, copy_job)
    runs = dict(await fetch_all(engine, "SELECT id, started_at FROM syncd.sync_runs"))
    assert versions == [
        (old_name, runs[first.run_id], runs[renamed.run_id]),
        ("Offsite daily", runs[renamed.run_id], None),
    ]
    assert await fetch_all(
        engine,
        "SELECT name, status, first_seen_at FROM syncd.jobs_current WHERE job_uid = :uid",
        uid=copy_job,
    ) == [("Offsite daily", "Failed", current[0][2])]
    named = await fetch_all(
        engine,
        "SELECT DISTINCT copy_job_name FROM syncd.job_links_named WHERE copy_job_uid = :uid",
        uid=copy_job,
    )
    assert named == [("Offsite daily",)]
    # And nothing more on the next no-op.
    assert (await sync_once()).status == "succeeded"
    assert await data_writes(engine) == after_rename
    await assert_history_sound(engine)


async def test_each_collection_has_its_own_mass_delete_guard(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    assert (await run_sync(sim_state, simulator, sync_engine)).status == "succeeded"
    tenant = sim_state.tenants[TENANT]
    stored = len(tenant.jobs)
    tenant.jobs[:] = tenant.jobs[:50]
    sim_state.add_pairs(TENANT, 2)
    sim_state.invalidate(TENANT)
    guarded = await run_sync(sim_state, simulator, sync_engine)
    assert guarded.status == "partial"
    outcomes = statuses(guarded)
    assert outcomes.pop("jobs") == "partial"
    assert set(outcomes.values()) == {"succeeded"}
    assert guarded.collections["jobs"].removed == 0
    assert guarded.error is not None and guarded.error.startswith("jobs: mass-delete guard")
    assert f"of {stored} stored jobs" in guarded.error
    assert "--allow-mass-delete" in guarded.error
    # The links applied as usual (the new pairs' jobs joined the catalog: added, not removed).
    assert guarded.added == 2 and guarded.collections["jobs"].added > 0
    assert await current_pairs(engine, TENANT) >= expected_pairs(tenant)
    still = await fetch_all(
        engine, "SELECT count(*) FROM syncd.jobs_current WHERE tenant = :t", t=TENANT
    )
    assert still[0][0] > stored

    allowed = await run_sync(sim_state, simulator, sync_engine, allow_mass_delete=True)
    assert allowed.status == "succeeded" and allowed.collections["jobs"].removed > stored // 2
    assert await stored_jobs(engine, TENANT) == expected_jobs(tenant)
    await assert_history_sound(engine)


async def test_an_incomplete_collection_keeps_its_removals_and_spares_the_others(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    assert (await run_sync(sim_state, simulator, sync_engine)).status == "succeeded"
    tenant = sim_state.tenants[TENANT]
    ordered = sorted(job["instanceUid"] for job in tenant.jobs)
    gone, renamed = ordered[0], ordered[10]  # both on the first page
    tenant.jobs[:] = [job for job in tenant.jobs if job["instanceUid"] != gone]
    sim_state.rename_job(TENANT, renamed, "Renamed while a page failed")
    removed_pairs = sim_state.remove_pairs(TENANT, 3)
    sim_state.inject(sim.Fault("520", tenant=TENANT, collection="jobs", offset=98, times=None))
    partial = await run_sync(sim_state, simulator, sync_engine)
    assert partial.status == "partial"
    outcomes = statuses(partial)
    assert outcomes.pop("jobs") == "partial"
    assert set(outcomes.values()) == {"succeeded"}  # the links' removals went through
    assert partial.removed == len(removed_pairs)
    assert await current_pairs(engine, TENANT) == expected_pairs(tenant) | pairs_of(
        tenant.immediate_items
    )
    assert partial.error is not None
    assert partial.error.startswith("jobs: incomplete snapshot, removals withheld")
    assert "offset 98" in partial.error
    current = {
        str(uid): name
        for uid, name in await fetch_all(
            engine, "SELECT job_uid, name FROM syncd.jobs_current WHERE tenant = :t", t=TENANT
        )
    }
    assert gone in current  # not removed from an incomplete snapshot
    assert current[renamed] == "Renamed while a page failed"  # changes seen are applied
    # Only partial links runs confirm nothing; here every link collection was complete.
    confirmed = await fetch_all(
        engine,
        "SELECT count(*) FROM syncd.job_links_current WHERE tenant = :t "
        "AND last_confirmed_at IS NULL",
        t=TENANT,
    )
    assert confirmed == [(0,)]

    sim_state.clear_faults()
    healed = await run_sync(sim_state, simulator, sync_engine)
    assert healed.status == "succeeded" and healed.collections["jobs"].removed == 1
    assert await stored_jobs(engine, TENANT) == expected_jobs(tenant)
    await assert_history_sound(engine)


async def test_a_failed_collection_applies_nothing_and_the_run_is_partial(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    sim_state.inject(sim.Fault("403", tenant=TENANT, collection="organizations", times=None))
    result = await run_sync(sim_state, simulator, sync_engine)
    assert result.status == "partial"
    assert statuses(result)["organizations"] == "failed"
    assert result.error is not None and result.error.startswith("organizations: ")
    assert "HTTP 403" in result.error and "may read organizations" in result.error
    assert await fetch_all(engine, "SELECT count(*) FROM syncd.organizations_current") == [(0,)]
    # Names still resolve from the rest of the catalog; organizations are NULL.
    named = await fetch_all(
        engine,
        "SELECT count(copy_job_name), count(organization_name) FROM syncd.job_links_named",
    )
    assert named[0][0] > 0 and named[0][1] == 0


async def test_a_collection_the_server_lacks_is_unavailable_not_a_failure(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    sim_state.unavailable_collections.update({"jobs", "immediate_copy_job_objects"})
    with structlog.testing.capture_logs() as logged:
        first = await run_sync(sim_state, simulator, sync_engine)
        second = await run_sync(sim_state, simulator, sync_engine)
    for result in (first, second):
        assert result.status == "succeeded", result.error
        assert result.error is None
        assert statuses(result)["jobs"] == "unavailable"
        assert statuses(result)["immediate_copy_job_objects"] == "unavailable"
    # Said once, when it became unavailable, not on every run.
    warned = [e for e in logged if e["event"].startswith("collection unavailable")]
    assert sorted(e["collection"] for e in warned) == ["immediate_copy_job_objects", "jobs"]
    outcome = (
        await fetch_all(
            engine, "SELECT collections FROM syncd.sync_runs WHERE id = :id", id=second.run_id
        )
    )[0][0]["jobs"]
    assert outcome["status"] == "unavailable" and "HTTP 404" in outcome["error"]
    assert await fetch_all(
        engine, "SELECT unavailable_collections FROM syncd.tenants WHERE name = :t", t=TENANT
    ) == [(["immediate_copy_job_objects", "jobs"],)]
    # Links are named as far as the catalog goes: not at all without jobs.
    assert await fetch_all(
        engine, "SELECT count(*), count(copy_job_name) FROM syncd.job_links_named"
    ) == [(300, 0)]
    # The periodic links were confirmed: the immediate ones the server lacks have none stored.
    assert await fetch_all(
        engine,
        "SELECT count(*) FROM syncd.job_links_current WHERE last_confirmed_at IS NULL",
    ) == [(0,)]

    # The server gets the collections (an upgrade): said once, and the data arrives.
    sim_state.unavailable_collections.clear()
    with structlog.testing.capture_logs() as logged:
        back = await run_sync(sim_state, simulator, sync_engine)
    assert back.status == "succeeded"
    assert sorted(e["collection"] for e in logged if e["event"].endswith("no longer unavailable"))
    assert back.collections["jobs"].added == len(sim_state.tenants[TENANT].jobs)
    # ... and loses one again (a downgrade): its stored data stays, its pairs unconfirmed.
    sim_state.unavailable_collections.add("immediate_copy_job_objects")
    again = await run_sync(sim_state, simulator, sync_engine)
    assert again.status == "succeeded"
    assert again.current_pairs == 360  # the immediate pairs still count
    unconfirmed = await fetch_all(
        engine,
        "SELECT count(*) FROM syncd.job_links_current WHERE last_confirmed_at IS NULL",
    )
    assert unconfirmed == [(0,)]  # confirmed by `back`, not by `again`
    stale = await fetch_all(
        engine,
        "SELECT DISTINCT c.last_confirmed_at = r.started_at FROM syncd.job_links_current c "
        "JOIN syncd.sync_runs r ON r.id = :id",
        id=again.run_id,
    )
    assert stale == [(False,)]


async def test_every_collection_unavailable_fails_the_run(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    sim_state.unavailable_collections.update(collections.COLLECTIONS)
    result = await run_sync(sim_state, simulator, sync_engine)
    assert result.status == "failed"
    assert set(statuses(result).values()) == {"unavailable"}
    assert result.error is not None and "no collection is available" in result.error


async def test_collections_setting_limits_what_is_synced(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    result = await run_sync(
        sim_state, simulator, sync_engine, collections=["jobs", "backup_copy_job_objects"]
    )
    assert result.status == "succeeded"
    assert list(result.collections) == ["backup_copy_job_objects", "jobs"]
    assert {r.path for r in sim_state.request_log} == {
        sim.JOB_OBJECTS_PATH,
        sim.JOBS_PATH,
    }
    assert await stored_pairs(engine, TENANT, "immediate") == set()


async def test_page_bound_holds_for_the_whole_tenant(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    sim_state.inject(sim.Fault("latency", tenant=TENANT, delay_s=0.02, times=None))
    result = await run_sync(sim_state, simulator, sync_engine, max_concurrent_pages=3)
    assert result.status == "succeeded"
    paths = {record.path for record in sim_state.request_log}
    assert paths == set(sim.COLLECTION_PATHS.values())  # every collection was read...
    assert sim_state.max_in_flight[TENANT] == 3  # ...under one bound of 3 pages


async def test_hostile_catalog_text_is_cleaned_and_wrong_types_are_page_problems(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    tenant = sim_state.tenants[TENANT]
    uid = tenant.jobs[0]["instanceUid"]
    sim_state.set_job_fields(TENANT, uid, name="evil\x1b[31m\x00name" + "x" * 5000)
    result = await run_sync(sim_state, simulator, sync_engine)
    assert result.status == "succeeded", result.error
    (name,) = (
        await fetch_all(engine, "SELECT name FROM syncd.jobs_current WHERE job_uid = :u", u=uid)
    )[0]
    assert name.startswith("evil[31mname") and len(name) == collections.TEXT_MAX_CHARS

    ordered = sorted(job["instanceUid"] for job in tenant.jobs)
    sim_state.set_job_fields(TENANT, ordered[60], isEnabled="yes")
    bad = await run_sync(sim_state, simulator, sync_engine)
    assert statuses(bad)["jobs"] == "partial"
    assert bad.error is not None and "data[11].isEnabled: not a boolean: 'yes'" in bad.error


def test_catalog_pages_parse_into_records_with_only_the_spec_fields() -> None:
    body = (
        b'{"meta": {"pagingInfo": {"total": 1, "count": 1, "offset": 0}}, "data": [{'
        b'"instanceUid": "0A1B2C3D-0000-4000-8000-000000000001", "name": "Org\\n1", '
        b'"alias": null, "type": "Company", "email": "a@b.example", "phone": "555"}]}'
    )
    page = paging.parse_page(
        body,
        tenant="t",
        offset=0,
        limit=10,
        expected_total=None,
        collection=collections.ORGANIZATIONS,
    )
    assert page.pairs == [] and page.count == 1
    (record,) = page.records
    assert record.uid == "0a1b2c3d-0000-4000-8000-000000000001"
    assert record.attributes == '{"name":"Org 1","type":"Company"}'
    assert record.volatile == "{}"
    for item, problem in [
        ('{"name": "x"}', "data[0].instanceUid: missing (required)"),
        ('{"instanceUid": 5}', "data[0].instanceUid: not a string: 5"),
        ('{"instanceUid": "0a1b2c3d-0000-4000-8000-000000000001", "name": ["x"]}',
         "data[0].name: not a string"),
    ]:  # fmt: skip
        with pytest.raises(errors.PageProblem, match=re.escape(problem)):
            paging.parse_page(
                b'{"data": [' + item.encode() + b"]}",
                tenant="t",
                offset=0,
                limit=10,
                expected_total=None,
                collection=collections.ORGANIZATIONS,
            )


def test_collection_specs_agree_with_the_views() -> None:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "migrations" / "versions" / "0005_catalog.py"
    spec = importlib.util.spec_from_file_location("migration_0005", path)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    assert migration.PROTECTABLE_JOB_TYPES == collections.PROTECTABLE_JOB_TYPES
    for collection in collections.COLLECTIONS.values():
        # The sort is a total order: it covers the identity.
        assert {f.source for f in collection.identity} <= set(collection.sort)
        assert (collection.kind is collections.Kind.LINKS) == (collection.copy_mode is not None)


def test_metrics_carry_the_collection() -> None:
    registry = metrics.Metrics()
    result = SyncResult(
        tenant="acme",
        status=RunStatus.SUCCEEDED,
        run_id=1,
        collections={
            "jobs": CollectionResult(Status.SUCCEEDED, added=5, changed=2, current=40),
            "organizations": CollectionResult(Status.UNAVAILABLE),
        },
    )
    registry.record_run(result, 0)
    text = registry.render().decode()
    assert 'syncd_items_current{collection="jobs",tenant="acme"} 40.0' in text
    assert 'syncd_items_changed_total{change="changed",collection="jobs",tenant="acme"} 2.0' in text
    assert (
        'syncd_collection_runs_total{collection="organizations",status="unavailable",'
        'tenant="acme"} 1.0'
    ) in text


# --- syncd check --------------------------------------------------------------------------


async def test_check_shows_which_collections_answer(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    tenant = tenant_for(sim_state.tenants[TENANT], simulator)
    result = await ops.check_tenant(tenant)
    assert result.page_ok and result.total_pairs == 360
    assert result.collections_text() == "5 of 5"
    sim_state.unavailable_collections.add("organizations")
    sim_state.inject(sim.Fault("403", tenant=TENANT, collection="jobs", times=None))
    result = await ops.check_tenant(tenant)
    assert result.collections == {
        "backup_copy_job_objects": "ok",
        "immediate_copy_job_objects": "ok",
        "jobs": "failed",
        "backup_servers": "ok",
        "organizations": "unavailable",
    }
    assert result.collections_text() == "3 of 5; unavailable: organizations; failed: jobs"
    assert not result.page_ok
    assert result.problem is not None and result.problem.startswith("jobs: ")


# --- the report views on a hand-built dataset ----------------------------------------------

ORG_A, ORG_B = "a0000000-0000-4000-8000-00000000000a", "b0000000-0000-4000-8000-00000000000b"
SERVER_1 = "51000000-0000-4000-8000-000000000001"
SERVER_2 = "52000000-0000-4000-8000-000000000002"
LOST_SERVER = "5f000000-0000-4000-8000-00000000000f"
OFFSITE = "c1000000-0000-4000-8000-000000000001"  # periodic copy job
MIRROR = "c2000000-0000-4000-8000-000000000002"  # immediate copy job
UNKNOWN_COPY = "c3000000-0000-4000-8000-000000000003"  # a copy job the catalog lacks
SQL = "d1000000-0000-4000-8000-000000000001"
FILES = "d2000000-0000-4000-8000-000000000002"
GONE = "d3000000-0000-4000-8000-000000000003"  # linked, deleted from VBR
WEB = "e1000000-0000-4000-8000-000000000001"
LAPTOPS = "e2000000-0000-4000-8000-000000000002"
EDGE = "e3000000-0000-4000-8000-000000000003"
OLD = "e4000000-0000-4000-8000-000000000004"
REPLICA = "e5000000-0000-4000-8000-000000000005"


def _job(uid: str, name: str, job_type: str, server: str, **extra: Any) -> dict[str, Any]:
    owner = {SERVER_1: ORG_A, SERVER_2: ORG_B}.get(server, ORG_A)
    return {
        "instanceUid": uid,
        "name": name,
        "type": job_type,
        "backupServerUid": server,
        "organizationUid": owner,
        "isEnabled": True,
        "status": "Success",
        **extra,
    }


def hand_built() -> sim.SimTenant:
    """A tenant small enough to know every answer of the report views."""
    return sim.SimTenant(
        name="acme",
        api_key="key-acme",
        username="acme-user",
        password="acme-password",
        items=[
            {"jobUid": OFFSITE, "linkedJobUid": SQL},
            {"jobUid": OFFSITE, "linkedJobUid": GONE},
            {"jobUid": UNKNOWN_COPY, "linkedJobUid": FILES},
        ],
        immediate_items=[
            {"jobUid": MIRROR, "linkedJobUid": SQL},
            {"jobUid": MIRROR, "linkedJobUid": FILES},
        ],
        organizations=[
            {"instanceUid": ORG_A, "name": "Org A", "alias": "a", "type": "Provider"},
            {"instanceUid": ORG_B, "name": "Org B", "alias": "b", "type": "Company"},
        ],
        backup_servers=[
            {"instanceUid": SERVER_1, "name": "vbr-1", "organizationUid": ORG_A},
            {"instanceUid": SERVER_2, "name": "vbr-2", "organizationUid": ORG_B},
        ],
        jobs=[
            _job(OFFSITE, "Offsite daily", "BackupCopy", SERVER_1, mappedOrganizationUid=ORG_B),
            _job(MIRROR, "Mirror", "SimpleBackupCopy", SERVER_2),
            _job(SQL, "SQL backup", "BackupVm", SERVER_1),
            _job(FILES, "File servers", "AgentBackupJob", SERVER_2),
            _job(WEB, "Web farm", "BackupVm", SERVER_1, mappedOrganizationUid=ORG_B),
            _job(LAPTOPS, "Laptops", "AgentPolicy", SERVER_2),
            # On a server the catalog does not know: the job's own owner names it.
            _job(EDGE, "Edge", "BackupVm", LOST_SERVER),
            _job(OLD, "Old VMs", "BackupVm", SERVER_1, isEnabled=False),
            _job(REPLICA, "DR replica", "ReplicationVM", SERVER_1),
        ],
    )


@pytest.fixture
async def report_db(sync_engine: AsyncEngine) -> AsyncEngine:
    state = sim.SimulatorState([hand_built()])
    async with sim.run_simulator(state) as url:
        result = await run_sync(state, url, sync_engine, "acme")
    assert result.status == "succeeded", result.error
    return sync_engine


async def test_job_links_named_on_a_hand_built_dataset(report_db: AsyncEngine) -> None:
    rows = await fetch_all(
        report_db,
        "SELECT tenant, copy_mode, copy_job_uid::text, copy_job_name, source_job_uid::text, "
        "source_job_name, source_job_type, backup_server_name, organization_name "
        "FROM syncd.job_links_named",
    )
    assert sorted(rows, key=str) == sorted(
        [
            # Assigned to Org B, on Org A's server: the assignment wins.
            ("acme", "periodic", OFFSITE, "Offsite daily", SQL, "SQL backup", "BackupVm",
             "vbr-1", "Org B"),
            # A source job deleted from VBR: a finding, NULL names.
            ("acme", "periodic", OFFSITE, "Offsite daily", GONE, None, None, "vbr-1", "Org B"),
            # A copy job the catalog lacks: no name, no server, no organization.
            ("acme", "periodic", UNKNOWN_COPY, None, FILES, "File servers", "AgentBackupJob",
             None, None),
            # Not assigned: its server's owner.
            ("acme", "immediate", MIRROR, "Mirror", SQL, "SQL backup", "BackupVm", "vbr-2",
             "Org B"),
            ("acme", "immediate", MIRROR, "Mirror", FILES, "File servers", "AgentBackupJob",
             "vbr-2", "Org B"),
        ],
        key=str,
    )  # fmt: skip


async def test_unprotected_jobs_on_a_hand_built_dataset(report_db: AsyncEngine) -> None:
    rows = await fetch_all(
        report_db,
        "SELECT tenant, job_uid::text, name, type, backup_server_name, organization_name "
        "FROM syncd.unprotected_jobs ORDER BY name",
    )
    # SQL and File servers are copied (File servers only by the immediate copy job); Old VMs
    # is disabled; DR replica is not a type a backup copy job copies; copy jobs are copies.
    assert rows == [
        ("acme", EDGE, "Edge", "BackupVm", None, "Org A"),
        ("acme", LAPTOPS, "Laptops", "AgentPolicy", "vbr-2", "Org B"),
        ("acme", WEB, "Web farm", "BackupVm", "vbr-1", "Org B"),
    ]


def cookbook(title: str) -> str:
    """The SQL under the README cookbook paragraph that starts with `title`."""
    match = re.search(
        rf"^{re.escape(title)}.*?\n\n```sql\n(.*?)```", README, re.MULTILINE | re.DOTALL
    )
    assert match is not None, f"no cookbook entry {title!r}"
    return match[1]


async def test_readme_cookbook_answers_on_a_hand_built_dataset(report_db: AsyncEngine) -> None:
    async def ask(title: str) -> list[Any]:
        return await fetch_all(report_db, cookbook(title))

    assert await ask("What does copy job *Offsite daily* copy") == [
        ("acme", "periodic", "SQL backup", "BackupVm", _as_uuid(SQL)),
        ("acme", "periodic", None, None, _as_uuid(GONE)),
    ]
    assert await ask("Which copy jobs copy *SQL backup*") == [
        ("acme", "immediate", "Mirror", _as_uuid(MIRROR)),
        ("acme", "periodic", "Offsite daily", _as_uuid(OFFSITE)),
    ]
    copied_by_nothing = await ask("Which backup jobs are copied by nothing")
    assert {row[3] for row in copied_by_nothing} == {"Edge", "Laptops", "Web farm"}
    lost = await ask("Links to jobs that no longer exist")
    assert {(str(row[2]), str(row[4])) for row in lost} == {(OFFSITE, GONE), (UNKNOWN_COPY, FILES)}
    per_organization = await ask("Copy jobs per organization")
    assert set(per_organization) == {
        ("acme", "Org B", 1, 1, 3),  # Offsite daily (SQL, GONE) and Mirror (SQL, Files)
        ("acme", "(unknown)", 1, 0, 1),
    }
    assert await ask("Jobs renamed last month") == []
    assert await ask("Collections a server does not have") == []
    # A rename last month shows with both names (moved back in time by hand).
    async with report_db.begin() as connection:
        await connection.execute(
            sa.text(
                "UPDATE syncd.catalog_items SET valid_to = date_trunc('month', now()) "
                "- interval '10 days' WHERE uid = :uid"
            ),
            {"uid": WEB},
        )
        await connection.execute(
            sa.text(
                "INSERT INTO syncd.catalog_items (tenant_id, collection, uid, attributes, "
                "volatile, first_seen_at, valid_from, opened_run_id) "
                "SELECT tenant_id, collection, uid, attributes || CAST(:renamed AS jsonb), "
                "volatile, first_seen_at, valid_to, 1 FROM syncd.catalog_items WHERE uid = :uid"
            ),
            {"uid": WEB, "renamed": '{"name": "Web farm 2"}'},
        )
    renamed = await ask("Jobs renamed last month")
    assert [(row[0], str(row[1]), row[2], row[3]) for row in renamed] == [
        ("acme", WEB, "Web farm", "Web farm 2")
    ]


def _as_uuid(value: str) -> Any:
    import uuid

    return uuid.UUID(value)


# --- a database synced by the previous syncd, upgraded in place ----------------------------

NIL = "00000000-0000-0000-0000-000000000000"
LEGACY_PAIRS = [
    ("11111111-1111-4111-8111-111111111111", NIL, "21111111-1111-4111-8111-111111111111"),
    ("11111111-1111-4111-8111-111111111111", "31111111-1111-4111-8111-111111111111",
     "22222222-2222-4222-8222-222222222222"),
    ("12222222-2222-4222-8222-222222222222", NIL, "23333333-3333-4333-8333-333333333333"),
]  # fmt: skip


async def test_a_database_of_the_previous_schema_upgrades_in_place(empty_db_url: str) -> None:
    async with db.open_engine(empty_db_url, application_name=SYNC_APPLICATION_NAME) as engine:
        await db.migrate(engine, "0003")
        # What the previous syncd wrote: two runs (the second removed one pair).
        async with engine.begin() as connection:
            for statement in (
                # A fresh database: the identities give tenant 1 and runs 1 and 2.
                "INSERT INTO syncd.tenants (name, confirmed_run_id, confirmed_at, current_pairs) "
                "VALUES ('legacy', 2, '2026-11-02T00:00:00Z', 2)",
                "INSERT INTO syncd.runs (tenant_id, started_at, finished_at, status, "
                "pages_fetched, pairs_seen, pairs_added, pairs_removed) "
                "VALUES (1, now() - interval '2 days', now() - interval '2 days', "
                "'succeeded', 1, 3, 3, 0), "
                "(1, now() - interval '1 day', now() - interval '1 day', 'succeeded', 1, 2, "
                "0, 1)",
            ):
                await connection.execute(sa.text(statement))
            for index, (job, unique, linked) in enumerate(LEGACY_PAIRS):
                closed = index == 2
                await connection.execute(
                    sa.text(
                        "INSERT INTO syncd.links (tenant_id, job_uid, unique_job_uid, "
                        "linked_job_uid, valid_from, valid_to, opened_run_id, closed_run_id) "
                        "VALUES (1, :job, :unique, :linked, now() - interval '2 days', "
                        "CASE WHEN :closed THEN now() - interval '1 day' END, 1, "
                        "CASE WHEN :closed THEN 2 END)"
                    ),
                    {"job": job, "unique": unique, "linked": linked, "closed": closed},
                )
        history_columns = (
            "tenant, job_uid, unique_job_uid, linked_job_uid, valid_from, valid_to, "
            "opened_run_id, closed_run_id"
        )
        before = await fetch_all(
            engine, f"SELECT {history_columns} FROM syncd.job_links_history ORDER BY 2, 4"
        )
        current_before = await fetch_all(
            engine, "SELECT * FROM syncd.job_links_current ORDER BY 2, 4"
        )
        changes_before = await fetch_all(
            engine, "SELECT * FROM syncd.job_link_changes ORDER BY 2, 4, 6"
        )
        assert len(before) == 3 and len(current_before) == 2

        state = await db.migrate(engine)
        assert state.at_head

        # History intact, every link periodic, the new columns last.
        assert (
            await fetch_all(
                engine, f"SELECT {history_columns} FROM syncd.job_links_history ORDER BY 2, 4"
            )
            == before
        )
        assert await fetch_all(engine, "SELECT * FROM syncd.job_links_current ORDER BY 2, 4") == [
            (*row, "periodic") for row in current_before
        ]
        assert await fetch_all(engine, "SELECT * FROM syncd.job_link_changes ORDER BY 2, 4, 6") == [
            (*row, "periodic") for row in changes_before
        ]
        assert await fetch_all(
            engine, "SELECT id, status, pairs_seen, collections FROM syncd.sync_runs ORDER BY id"
        ) == [(1, "succeeded", 3, None), (2, "succeeded", 2, None)]
        for view in ("jobs_current", "job_links_named", "unprotected_jobs"):
            await fetch_all(engine, f"SELECT * FROM syncd.{view}")
        assert (await fetch_all(engine, "SELECT count(*) FROM syncd.job_links_named")) == [(2,)]
        # The mass-delete guard's baseline remembers the old runs.
        async with engine.connect() as connection:
            run = store.Run(id=3, tenant_id=1, tenant="legacy", started_at=_now())
            assert await store.delete_baseline(connection, run, 7 * 86400.0) == 3
            assert await store.delete_baseline(connection, run, 7 * 86400.0, "jobs") == 0

        # Today's syncd syncs on top of it: no pair is duplicated, the new one is added.
        open_pairs = [pair for pair in LEGACY_PAIRS[:2]]
        items = [
            {"jobUid": job, "linkedJobUid": linked}
            | ({} if unique == NIL else {"uniqueJobUid": unique})
            for job, unique, linked in open_pairs
        ]
        items.append(
            {"jobUid": "13333333-3333-4333-8333-333333333333", "linkedJobUid": LEGACY_PAIRS[0][2]}
        )
        legacy = sim.SimTenant("legacy", "key-legacy", "legacy-user", "pw", items=items)
        simulator_state = sim.SimulatorState([legacy])
        async with sim.run_simulator(simulator_state) as url:
            result = await run_sync(simulator_state, url, engine, "legacy")
        assert result.status == "succeeded", result.error
        assert (result.added, result.removed, result.current_pairs) == (1, 0, 3)
        assert await stored_pairs(engine, "legacy", "periodic") == pairs_of(items)
        await assert_history_sound(engine)


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def test_collections_stage_concurrently_on_one_connection(
    sim_state: sim.SimulatorState,
    simulator: str,
    sync_engine: AsyncEngine,
    engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Tiny COPY batches: the collections' flushes interleave with each other's pages all
    # the time, on the run's one connection.
    monkeypatch.setattr(sync, "COPY_BATCH_PAIRS", 7)
    monkeypatch.setattr(sync, "COPY_BATCH_RECORDS", 5)
    sim_state.inject(sim.Fault("latency", tenant=TENANT, delay_s=0.001, times=None))
    result = await run_sync(sim_state, simulator, sync_engine, max_concurrent_pages=8)
    assert result.status == "succeeded", result.error
    tenant = sim_state.tenants[TENANT]
    assert await stored_pairs(engine, TENANT, "immediate") == pairs_of(tenant.immediate_items)
    assert await stored_pairs(engine, TENANT, "periodic") == pairs_of(tenant.items)
    assert await stored_jobs(engine, TENANT) == expected_jobs(tenant)
