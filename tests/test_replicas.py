"""Three `syncd run` replicas on one database share 30 tenants: each tenant is synced once
per interval in total, never twice at once, by every replica in turn; SIGKILL one and the
others take its tenants over within one interval plus the run timeout. And a reload: a
changed tenant runs at once, and its new schedule sets its due time.

Everything is judged from `syncd.runs` on the database's clock (started_at, finished_at,
replica), never from this process's timing: the test only waits for time to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import simulator as sim
from tests.fixtures.daemons import DaemonProcess, running_daemon, serving_daemon
from tests.fixtures.fault_helpers import assert_history_sound, tenant_block, wait_for, write_config
from tests.fixtures.helpers import fetch_all

pytestmark = pytest.mark.slow

TENANTS = 30
INTERVAL_S = 2.0
RUN_TIMEOUT_S = 10.0
WINDOW_S = 44.0  # 22 intervals: 10% is 2.2 runs, more than the ±1 of a window's edges
REPLICAS = ("replica-a", "replica-b", "replica-c")


@pytest.fixture
def sim_state() -> sim.SimulatorState:
    """30 small tenants (20 pairs each: one page): the subject is scheduling, not volume."""
    return sim.SimulatorState(
        sim.make_dataset(tenants=TENANTS, pairs_per_tenant=20, seed=11), seed=11
    )


async def _db_now(engine: AsyncEngine) -> datetime:
    now: datetime = (await fetch_all(engine, "SELECT now()"))[0][0]
    return now


async def _runs(engine: AsyncEngine, since: datetime | None = None) -> list[Any]:
    """(tenant, started_at, finished_at, status, replica, error) of every run since `since`."""
    return await fetch_all(
        engine,
        "SELECT tenant, started_at, finished_at, status, replica, error FROM syncd.sync_runs "
        "WHERE started_at >= coalesce(CAST(:since AS timestamptz), '-infinity') ORDER BY id",
        since=since,
    )


def _overlaps(runs: list[Any]) -> list[tuple[Any, Any]]:
    """Pairs of runs of one tenant whose [started_at, finished_at) intersect."""
    by_tenant: dict[str, list[Any]] = defaultdict(list)
    for run in runs:
        by_tenant[run[0]].append(run)
    found = []
    for tenant_runs in by_tenant.values():
        ordered = sorted(tenant_runs, key=lambda run: run[1])
        for earlier, later in itertools.pairwise(ordered):
            if earlier[2] is None or later[1] < earlier[2]:
                found.append((earlier, later))
    return found


async def _wait_until(engine: AsyncEngine, moment: datetime, what: str) -> None:
    """Waits for the database's clock to pass `moment`."""

    async def passed() -> bool:
        remaining_s = (moment - await _db_now(engine)).total_seconds()
        if remaining_s > 0:
            await asyncio.sleep(min(remaining_s, 1.0))
        return remaining_s <= 0

    timeout_s = (moment - await _db_now(engine)).total_seconds() + 10.0
    await wait_for(passed, timeout_s=timeout_s, what=what)


async def test_three_replicas_share_the_tenants_and_take_over_from_a_killed_one(
    sim_state: sim.SimulatorState,
    simulator: str,
    db_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
) -> None:
    tenants = [tenant_block(tenant, simulator) for tenant in sim_state.tenants.values()]
    paths = [
        write_config(
            tmp_path / f"{name}.toml",
            db_url,
            tenants,
            # The links alone: the subject is who runs when, and 30 tenants' five collections
            # every 2 s would measure a loaded 2-core machine instead.
            sync={
                "interval": f"{INTERVAL_S:g}s",
                "run_timeout": f"{RUN_TIMEOUT_S:g}s",
                "collections": ["backup_copy_job_objects"],
            },
            daemon={
                "listen": "127.0.0.1:0",
                "replica_name": name,
                "startup_spread": "2s",
                "shutdown_grace": "5s",
            },
        )
        for name in REPLICAS
    ]
    async with contextlib.AsyncExitStack() as stack:
        daemons: dict[str, DaemonProcess] = {}
        for name, path in zip(REPLICAS, paths, strict=True):
            daemons[name] = await stack.enter_async_context(running_daemon(path))

        async def every_tenant_synced() -> bool:
            rows = await fetch_all(
                engine,
                "SELECT count(DISTINCT tenant) FROM syncd.sync_runs WHERE status = 'succeeded'",
            )
            return bool(rows[0][0] == TENANTS)

        await wait_for(every_tenant_synced, timeout_s=30, what="a first run of every tenant")

        # --- shared: once per interval in total, never at once, by every replica ----------
        start = await _db_now(engine) + timedelta(seconds=INTERVAL_S)
        end = start + timedelta(seconds=WINDOW_S)
        await _wait_until(engine, end + timedelta(seconds=1), "the observation window to end")
        window = [run for run in await _runs(engine, start) if run[1] < end]
        expected = WINDOW_S / INTERVAL_S
        per_tenant = Counter(run[0] for run in window)
        off = {
            tenant: per_tenant.get(tenant, 0)
            for tenant in sim_state.tenants
            if abs(per_tenant.get(tenant, 0) - expected) > 0.1 * expected
        }
        assert not off, f"runs per tenant in {WINDOW_S:g}s, {expected:g} expected: {off}"
        assert all(run[3] == "succeeded" for run in window), [
            r for r in window if r[3] != "succeeded"
        ]
        per_replica = Counter(run[4] for run in window)
        print(f"runs per tenant in the window: {sorted(per_tenant.values())}; {per_replica}")
        assert set(per_replica) == set(REPLICAS), per_replica
        assert min(per_replica.values()) >= 0.15 * len(window), per_replica
        for name, daemon in daemons.items():
            metrics = await daemon.metrics()
            assert metrics.value("syncd_claims_total", result="won") > 0, name
            assert metrics.value("syncd_claims_total", result="not_due") > 0, name

        # --- failover: SIGKILL one replica while it runs a tenant ------------------------
        # Runs slow enough to be caught in flight (still shorter than the interval).
        sim_state.inject(sim.Fault(kind="latency", delay_s=1.5, times=None))
        victim = REPLICAS[0]
        slow_since = await _db_now(engine)

        async def victim_running() -> list[Any]:
            return [
                run
                for run in await _runs(engine, slow_since)
                if run[3] == "running" and run[4] == victim
            ]

        await wait_for(victim_running, timeout_s=20, what=f"{victim} running a tenant")
        daemons[victim].process.send_signal(signal.SIGKILL)
        assert await daemons[victim].wait_exit(10) == -signal.SIGKILL
        killed_at = await _db_now(engine)
        sim_state.clear_faults()
        in_flight = [
            run
            for run in await _runs(engine, slow_since)
            if run[3] == "running" and run[4] == victim
        ]
        assert in_flight, "the victim was killed with a run in flight"

        deadline = killed_at + timedelta(seconds=INTERVAL_S + RUN_TIMEOUT_S)

        async def all_synced_since_kill() -> bool:
            done = {run[0] for run in await _runs(engine, killed_at) if run[3] == "succeeded"}
            return len(done) == TENANTS

        await wait_for(
            all_synced_since_kill,
            timeout_s=INTERVAL_S + RUN_TIMEOUT_S + 15,
            what="every tenant synced by the surviving replicas",
        )
        after = await _runs(engine, killed_at)
        first_success: dict[str, Any] = {}
        for run in after:
            if run[3] == "succeeded":
                first_success.setdefault(run[0], run)
        late = {tenant: run[2] for tenant, run in first_success.items() if run[2] > deadline}
        slowest = max(run[2] for run in first_success.values()) - killed_at
        print(f"every tenant synced within {slowest.total_seconds():.1f}s of the kill")
        assert not late, f"synced later than {deadline} (killed at {killed_at}): {late}"
        assert {run[4] for run in after} <= set(REPLICAS[1:])

        # The run the victim left is closed as abandoned by the replica that took over.
        for orphan in in_flight:
            rows = await fetch_all(
                engine,
                "SELECT status, error FROM syncd.sync_runs "
                "WHERE tenant = :tenant AND started_at = :started",
                tenant=orphan[0],
                started=orphan[1],
            )
            assert rows[0][0] == "failed"
            assert rows[0][1].startswith("abandoned: the process running it stopped"), rows

        for name in REPLICAS[1:]:
            daemons[name].send(signal.SIGTERM)
        for name in REPLICAS[1:]:
            assert await daemons[name].wait_exit(15) == 0

    everything = await _runs(engine)
    assert _overlaps(everything) == []
    await assert_history_sound(engine)


async def test_a_reload_runs_a_changed_tenant_at_once_and_its_schedule_sets_the_due_time(
    sim_state: sim.SimulatorState, simulator: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    tenants = [sim_state.tenants["tenant-1"], sim_state.tenants["tenant-2"]]

    def write(tenant_1_interval: str) -> Path:
        return write_config(
            tmp_path / "syncd.toml",
            "postgresql://unused@127.0.0.1:1/unused",  # serve() is given the engine
            [
                tenant_block(tenants[0], simulator, interval=tenant_1_interval),
                tenant_block(tenants[1], simulator, interval="1h"),
            ],
            daemon={"startup_spread": "100ms"},
        )

    async def schedule() -> dict[str, tuple[Any, ...]]:
        rows = await fetch_all(
            engine,
            "SELECT t.name, s.schedule, s.due_at - r.started_at, "
            "(SELECT count(*) FROM syncd.runs WHERE tenant_id = t.id AND status = 'succeeded'), "
            "s.claimed_by IS NULL "
            "FROM syncd.schedule s JOIN syncd.tenants t ON t.id = s.tenant_id "
            "JOIN LATERAL (SELECT started_at FROM syncd.runs WHERE tenant_id = t.id "
            "ORDER BY id DESC LIMIT 1) r ON true",
        )
        return {row[0]: row[1:] for row in rows}

    async def runs_done(count: int) -> dict[str, tuple[Any, ...]] | None:
        found = await schedule()
        # A run's row is finished before its claim is released with the next due time.
        done = (
            len(found) == 2
            and found["tenant-1"][2] == count
            and found["tenant-2"][2] == 1
            and all(row[3] for row in found.values())
        )
        return found if done else None

    async with serving_daemon(write("1h"), engine) as (daemon, _):
        first = await wait_for(lambda: runs_done(1), what="a first run of both tenants")
        assert first["tenant-1"][0] == "every 3600s"
        write("30m")
        daemon.reload()
        # Due in an hour, but changed: it runs at once, and its new schedule sets the due
        # time (tenant-2, unchanged, keeps its own).
        second = await wait_for(lambda: runs_done(2), what="the changed tenant's run")
    assert second["tenant-1"][0] == "every 1800s"
    assert abs(second["tenant-1"][1] - timedelta(minutes=30)) < timedelta(seconds=1)
    assert second["tenant-2"][0] == "every 3600s"
