"""syncd's process dying or competing: SIGKILL of `syncd sync` while it fetches and while it
applies, two `syncd run` daemons on one database (their claims keep them from running one
tenant twice), and SIGTERM with runs in flight.

Processes are stopped at a known phase by holding locks or slowing VSPC down and watching
the database (`pg_stat_activity`, `sync_runs`), never with fixed sleeps. After each fault a
clean run must close what the dead process left (`abandoned`) and store the exact snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import db, store
from syncd import simulator as sim
from syncd.sync import sync_tenant
from tests.fixtures.fault_helpers import (
    assert_history_sound,
    run_cli,
    start_cli,
    tenant_block,
    wait_for,
    write_config,
)
from tests.fixtures.helpers import (
    SYNC_APPLICATION_NAME,
    current_pairs,
    expected_pairs,
    fetch_all,
    tenant_for,
)

pytestmark = pytest.mark.slow

TENANT = "tenant-1"


async def _baseline_then_churn(
    state: sim.SimulatorState, url: str, db_url: str, engine: AsyncEngine
) -> set[tuple[str, str | None, str]]:
    async with db.open_engine(db_url, application_name=SYNC_APPLICATION_NAME) as own:
        result = await sync_tenant(tenant_for(state.tenants[TENANT], url), own)
    assert result.status == "succeeded", result.error
    state.remove_pairs(TENANT, 4)
    state.add_pairs(TENANT, 3)
    return await current_pairs(engine, TENANT)


async def _advisory_lock_held(engine: AsyncEngine, tenant: str) -> bool:
    """Whether some session holds `tenant`'s sync lock (a dead process's backend, say)."""
    held = await fetch_all(
        engine,
        "SELECT count(*) FROM pg_locks l JOIN syncd.tenants t ON l.objid = t.id "
        "WHERE l.locktype = 'advisory' AND l.classid = :namespace AND l.objsubid = 2 "
        "AND t.name = :tenant AND l.database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())",
        namespace=store.LOCK_NAMESPACE,
        tenant=tenant,
    )
    return bool(held[0][0])


async def _running_runs(engine: AsyncEngine) -> list[Any]:
    return await fetch_all(engine, "SELECT id FROM syncd.sync_runs WHERE status = 'running'")


async def _clean_run_closes_the_abandoned_one(
    path: Path, state: sim.SimulatorState, engine: AsyncEngine, killed_run: int
) -> None:
    clean = await run_cli("--config", str(path), "sync")
    assert clean.code == 0, clean.output
    assert "succeeded" in clean.stdout
    rows = await fetch_all(
        engine, "SELECT status, error FROM syncd.sync_runs WHERE id = :id", id=killed_run
    )
    assert rows[0][0] == "failed"
    assert rows[0][1].startswith("abandoned: the process running it stopped"), rows
    assert await current_pairs(engine, TENANT) == expected_pairs(state.tenants[TENANT])
    await assert_history_sound(engine)


async def test_sigkill_while_fetching(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    s0 = await _baseline_then_churn(sim_state, simulator, db_url, engine)
    sim_state.inject(sim.Fault(kind="latency", tenant=TENANT, delay_s=0.2, times=None))
    path = write_config(tmp_path, db_url, [tenant_block(sim_state.tenants[TENANT], simulator)])
    process = await start_cli("--config", str(path), "sync")
    try:

        async def fetching_run() -> int | None:
            assert process.returncode is None, "syncd sync ended before it was killed"
            rows = await _running_runs(engine)
            return int(rows[0][0]) if rows and sim_state.in_flight[TENANT] else None

        killed_run = await wait_for(fetching_run, timeout_s=20, what="a run fetching pages")
    finally:
        process.kill()
        await process.wait()
    assert process.returncode == -signal.SIGKILL
    await wait_for(
        lambda: _not(_advisory_lock_held(engine, TENANT)),
        what="the dead process's session to end",
    )
    assert await current_pairs(engine, TENANT) == s0
    assert await _running_runs(engine) == [(killed_run,)]
    await assert_history_sound(engine, allow_running=True)

    sim_state.clear_faults()
    await _clean_run_closes_the_abandoned_one(path, sim_state, engine, killed_run)


async def _not(awaitable: Any) -> bool:
    return not await awaitable


async def test_sigkill_while_applying(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    s0 = await _baseline_then_churn(sim_state, simulator, db_url, engine)
    path = write_config(tmp_path, db_url, [tenant_block(sim_state.tenants[TENANT], simulator)])
    async with engine.connect() as holder:
        transaction = await holder.begin()
        # The apply transaction's last statement updates this row: the run stops there,
        # its link writes done but not committed.
        await holder.execute(
            sa.text("SELECT id FROM syncd.tenants WHERE name = :name FOR NO KEY UPDATE"),
            {"name": TENANT},
        )
        process = await start_cli("--config", str(path), "sync")
        try:

            async def applying() -> bool:
                assert process.returncode is None, "syncd sync ended before it was killed"
                rows = await fetch_all(
                    engine,
                    "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND application_name = 'syncd'",
                )
                return any(row[0].lstrip().startswith("WITH tenant AS") for row in rows)

            await wait_for(applying, timeout_s=20, what="the run to wait inside its apply")
            killed_run = int((await _running_runs(engine))[0][0])
        finally:
            process.kill()
            await process.wait()
        assert process.returncode == -signal.SIGKILL
        # The orphaned backend still waits for our lock; nothing it wrote is visible.
        assert await current_pairs(engine, TENANT) == s0
        await transaction.rollback()
    # Released, it runs its UPDATE, finds its client gone, rolls back and exits.
    await wait_for(
        lambda: _not(_advisory_lock_held(engine, TENANT)),
        what="the orphaned backend to roll back and end",
    )
    assert await current_pairs(engine, TENANT) == s0
    assert await _running_runs(engine) == [(killed_run,)]
    await assert_history_sound(engine, allow_running=True)
    await _clean_run_closes_the_abandoned_one(path, sim_state, engine, killed_run)


# --- two daemons on one database; SIGTERM with runs in flight -----------------------------


class _Daemon:
    """A `syncd run` subprocess; its JSON log lines; its HTTP port (from its log)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.port: int | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.lines.append(text)
            if self.port is None and '"http endpoint listening"' in text:
                self.port = int(json.loads(text)["port"])

    def events(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    found.append(record)
        return found

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        await self._reader


@contextlib.asynccontextmanager
async def _daemon(path: Path) -> AsyncIterator[_Daemon]:
    daemon = _Daemon(await start_cli("--config", str(path), "run"))
    try:

        async def listening() -> bool:
            assert daemon.process.returncode is None, "\n".join(daemon.lines)
            return daemon.port is not None

        await wait_for(listening, timeout_s=20, what="syncd run to listen")
        yield daemon
    finally:
        await daemon.close()
        print(f"--- syncd run (exit {daemon.process.returncode}) ---", *daemon.lines, sep="\n")


async def _claims_taken(session: aiohttp.ClientSession, daemon: _Daemon) -> float:
    """How often `daemon` found a due tenant claimed by the other one."""
    async with session.get(f"http://127.0.0.1:{daemon.port}/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "syncd_claims_total" and sample.labels.get("result") == "taken"
    )


async def _healthy(session: aiohttp.ClientSession, daemon: _Daemon) -> bool:
    async with session.get(f"http://127.0.0.1:{daemon.port}/healthz") as response:
        return response.status == 200


async def test_two_daemons_share_a_database_then_stop_with_runs_in_flight(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    tenants = list(sim_state.tenants.values())
    # Slow pages make runs long enough to collide; short intervals make them collide often.
    sim_state.inject(sim.Fault(kind="latency", delay_s=0.03, times=None))
    path = write_config(
        tmp_path,
        db_url,
        [tenant_block(tenant, simulator, interval="300ms") for tenant in tenants],
        # The links alone: the subject is two processes on one database, not the catalog.
        sync={"max_concurrent_pages": 1, "collections": ["backup_copy_job_objects"]},
        daemon={"listen": "127.0.0.1:0", "startup_spread": "50ms", "shutdown_grace": "200ms"},
    )
    async with (
        _daemon(path) as first,
        _daemon(path) as second,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
    ):
        pids = {first.process.pid, second.process.pid}

        async def both_served_and_collided() -> bool:
            assert await _healthy(session, first) and await _healthy(session, second)
            rows = await fetch_all(
                engine,
                "SELECT pid, count(*) FROM syncd.runs WHERE status = 'succeeded' GROUP BY pid",
            )
            per_process = {int(pid): count for pid, count in rows}
            taken = [await _claims_taken(session, daemon) for daemon in (first, second)]
            return all(per_process.get(pid, 0) >= 1 for pid in pids) and sum(taken) > 0

        await wait_for(
            both_served_and_collided,
            timeout_s=30,
            what="both daemons to sync, and to meet each other's claims",
        )
        # VSPC changes while both keep syncing.
        for tenant in tenants:
            sim_state.churn(tenant.name, 0.02)

        since_churn = await _now(engine)
        await wait_for(
            lambda: _all_tenants_succeeded_since(engine, since_churn, len(tenants)),
            timeout_s=30,
            what="a successful run of every tenant after the churn",
        )
        for tenant in tenants:
            assert await current_pairs(engine, tenant.name) == expected_pairs(tenant)

        # Stop both with runs in flight: VSPC now answers slowly, past the grace period. Only
        # a run started after that is sure to be slow (an earlier one may finish in time).
        slow_since = await _now(engine)
        sim_state.inject(sim.Fault(kind="latency", delay_s=1.0, times=None))
        await wait_for(
            lambda: _running_since(engine, slow_since),
            timeout_s=30,
            what="a slow run in flight before SIGTERM",
        )
        for daemon in (first, second):
            daemon.process.send_signal(signal.SIGTERM)
        for daemon in (first, second):
            assert await asyncio.wait_for(daemon.process.wait(), 15) == 0

    assert await _running_runs(engine) == [], "SIGTERM left runs running"
    interrupted = await fetch_all(
        engine, "SELECT count(*) FROM syncd.sync_runs WHERE error LIKE 'interrupted%'"
    )
    assert interrupted[0][0] >= 1
    # No two runs of one tenant ever overlapped in time: claims (and, behind them, the
    # tenant's lock) serialized the daemons.
    overlaps = await fetch_all(
        engine,
        """
        SELECT a.id, b.id FROM syncd.sync_runs a JOIN syncd.sync_runs b
            ON a.tenant = b.tenant AND a.id < b.id
         WHERE b.started_at < a.finished_at AND a.started_at < b.finished_at
        """,
    )
    assert overlaps == []
    await assert_history_sound(engine)
    for tenant in tenants:
        assert await current_pairs(engine, tenant.name) == expected_pairs(tenant)


async def _now(engine: AsyncEngine) -> Any:
    return (await fetch_all(engine, "SELECT now()"))[0][0]


async def _all_tenants_succeeded_since(engine: AsyncEngine, since: Any, count: int) -> bool:
    rows = await fetch_all(
        engine,
        "SELECT count(DISTINCT tenant) FROM syncd.sync_runs "
        "WHERE status = 'succeeded' AND started_at > :since",
        since=since,
    )
    return bool(rows[0][0] == count)


async def _running_since(engine: AsyncEngine, since: Any) -> bool:
    rows = await fetch_all(
        engine,
        "SELECT count(*) FROM syncd.sync_runs WHERE status = 'running' AND started_at > :since",
        since=since,
    )
    return bool(rows[0][0])
