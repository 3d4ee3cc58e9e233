"""`syncd run` as a real process: against the in-test simulator and this test's database.

Each test starts the daemon as a subprocess with a config file it writes, reads its JSON log
lines from stderr (the HTTP port comes from the "http endpoint listening" line, as the
config asks for port 0), and polls /metrics, /status and the database with deadlines.
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import collections, config, db
from syncd import simulator as sim
from tests.fixtures.daemons import (
    DaemonProcess,
    Metrics,
    running_daemon,
    serving_daemon,
    write_config,
)
from tests.fixtures.database import admin_connection
from tests.fixtures.fault_helpers import wait_for
from tests.fixtures.helpers import fetch_all

pytestmark = pytest.mark.slow


def _assert_clean_logs(daemon: DaemonProcess, secrets: Iterable[str]) -> None:
    """Every line is a JSON object with the basics; no secret appears anywhere."""
    for line in daemon.stderr_lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"event", "level", "timestamp"} <= record.keys(), line
    output = daemon.all_output()
    for secret in secrets:
        assert secret not in output


async def _running_rows(engine: AsyncEngine) -> list[Any]:
    return await fetch_all(
        engine, "SELECT id, tenant FROM syncd.sync_runs WHERE status = 'running'"
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- tests -----------------------------------------------------------------------------------


async def test_syncs_every_tenant_on_schedule_while_one_keeps_failing(
    tmp_path: Path,
    db_url: str,
    engine: AsyncEngine,
    sim_state: sim.SimulatorState,
    simulator: str,
) -> None:
    tenants = list(sim_state.tenants.values())
    sim_state.inject(sim.Fault(kind="403", tenant="tenant-3", times=None))
    sim_state.inject(sim.Fault(kind="520", tenant="tenant-2", offset=0, times=1))
    config_path = tmp_path / "syncd.toml"
    write_config(
        config_path,
        database_url=db_url,
        simulator_url=simulator,
        tenants=tenants,
        daemon={"max_failure_backoff_factor": 4},
    )
    started = time.time()
    async with running_daemon(config_path) as daemon:
        assert (await daemon.get_json("/healthz"))[0] == 200

        # Good tenants keep their 1 s schedule: 3 runs each in ~2 s (plus jitter and slack).
        for name in ("tenant-1", "tenant-2"):
            await daemon.wait_runs(name, 3, timeout_s=6.0)
        await daemon.wait_runs("tenant-3", 2, status="failed", timeout_s=6.0)

        metrics = await daemon.metrics()
        assert metrics.value("syncd_pairs_current", tenant="tenant-1") == 300
        assert metrics.value("syncd_pairs_changed_total", tenant="tenant-1", change="added") == 300
        assert metrics.value("syncd_pairs_changed_total", tenant="tenant-1", change="removed") == 0
        assert (metrics.value("syncd_sync_duration_seconds_count", tenant="tenant-2") or 0) >= 3
        last_success = metrics.value("syncd_last_success_timestamp_seconds", tenant="tenant-1")
        assert last_success is not None and last_success >= started
        assert metrics.value("syncd_last_success_timestamp_seconds", tenant="tenant-3") is None
        assert metrics.total("syncd_http_requests_total", tenant="tenant-1", code="200") >= 18
        assert metrics.total("syncd_http_requests_total", tenant="tenant-3", code="403") >= 2
        assert metrics.total("syncd_http_retries_total", tenant="tenant-2") >= 1
        assert metrics.value("syncd_ready") == 1

        status, ready = await daemon.get_json("/readyz")
        assert (status, ready["ready"]) == (200, True)

        # The failing tenant backs off: after 2 failures in a row it is due 2 periods after
        # its run ended (its due time is in the database, so every replica holds back).
        async def backed_off() -> dict[str, Any] | None:
            row = (await daemon.tenant_status())["tenant-3"]
            return row if row["consecutive_failures"] >= 2 and not row["running"] else None

        failing = await wait_for(backed_off, timeout_s=5.0, what="tenant-3 backing off")
        gap_s = _seconds_between(failing["last_finished_at"], failing["due_at"])
        assert gap_s >= 2 * 1.0 - 0.01
        assert failing["last_replica"] == failing["claimed_by"] or failing["claimed_by"] is None
        assert failing["last_status"] == "failed"
        assert "403" in failing["last_error"] or "forbidden" in failing["last_error"].lower()
        assert failing["last_success_at"] is None

        healthy = (await daemon.tenant_status())["tenant-1"]
        assert healthy["consecutive_failures"] == 0
        assert healthy["pairs"] == 300
        # The last run's outcome per collection.
        assert {name: outcome["status"] for name, outcome in healthy["collections"].items()} == (
            dict.fromkeys(collections.COLLECTIONS, "succeeded")
        )
        assert failing["collections"]["jobs"]["status"] == "failed"
        metrics = await daemon.metrics()
        jobs = len(sim_state.tenants["tenant-1"].jobs)
        assert metrics.value("syncd_items_current", tenant="tenant-1", collection="jobs") == jobs
        assert healthy["last_success_at"] is not None
        assert healthy["next_run_at"] is not None
        assert healthy["schedule"] == "every 1s"

        for path in ("/status", "/metrics", "/readyz"):
            _, text = await daemon.get(path)
            assert not any(t.api_key in text for t in tenants), path

        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(10.0) == 0

    # Runs of the healthy tenants were never held up by the failing one's.
    for name in ("tenant-1", "tenant-2"):
        starts = [
            row[0]
            for row in await fetch_all(
                engine,
                "SELECT extract(epoch FROM started_at) FROM syncd.sync_runs "
                "WHERE tenant = :tenant AND status = 'succeeded' ORDER BY id",
                tenant=name,
            )
        ]
        gaps = [float(b - a) for a, b in itertools.pairwise(starts)]
        assert gaps and max(gaps) < 1.0 * 1.1 + 0.5, (name, gaps)
    assert await _running_rows(engine) == []

    _assert_clean_logs(daemon, [t.api_key for t in tenants])
    logs = daemon.logs()
    finished = [line for line in logs if line["event"] == "sync finished"]
    assert finished and all("tenant" in line and "run_id" in line for line in finished)
    run_lines = [
        line
        for line in logs
        if line.get("logger") in ("syncd.sync", "syncd.vspc", "apscheduler.executors.default")
    ]
    assert run_lines and all("tenant" in line for line in run_lines), [
        line for line in run_lines if "tenant" not in line
    ]
    client_lines = [line for line in logs if line.get("logger") == "syncd.vspc"]
    assert client_lines and all("run_id" in line for line in client_lines)


def _seconds_between(earlier: str, later: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


async def test_sigterm_lets_runs_finish_within_grace_then_interrupts_the_rest(
    tmp_path: Path,
    db_url: str,
    engine: AsyncEngine,
    sim_state: sim.SimulatorState,
    simulator: str,
) -> None:
    # Slow first pages of the links (the other collections' pages are quick): tenant-2's run
    # ends within the grace, tenant-1's does not.
    for tenant, delay_s in (("tenant-1", 60.0), ("tenant-2", 1.5)):
        sim_state.inject(
            sim.Fault(
                "latency",
                tenant=tenant,
                offset=0,
                delay_s=delay_s,
                times=None,
                collection="backup_copy_job_objects",
            )
        )
    config_path = tmp_path / "syncd.toml"
    grace_s = 3.0
    write_config(
        config_path,
        database_url=db_url,
        simulator_url=simulator,
        tenants=sim_state.tenants.values(),
        sync={"interval": "1h", "request_timeout": "2m"},
        daemon={"max_concurrent_tenants": 2, "shutdown_grace": f"{grace_s}s"},
    )
    async with running_daemon(config_path) as daemon:
        # Two slots: tenant-1 and tenant-2 run, tenant-3 waits for a slot.
        async def capped() -> dict[str, dict[str, Any]] | None:
            rows = await daemon.tenant_status()
            running = {name for name, row in rows.items() if row["running"]}
            queued = {name for name, row in rows.items() if row["queued"]}
            ok = running == {"tenant-1", "tenant-2"} and queued == {"tenant-3"}
            return rows if ok else None

        await wait_for(capped, timeout_s=5.0, what="two tenants running, one queued")
        assert sim_state.in_flight["tenant-3"] == 0

        daemon.send(signal.SIGTERM)
        await daemon.wait_not_ready("shutting down")
        assert await daemon.wait_exit(grace_s + 30.0) == 0
    # The daemon's own clock: it waited the whole grace before cancelling (the bound that
    # matters; how much longer a loaded machine took is not the subject).
    waited = daemon.log_events("waiting for runs in progress")[0]
    cancelled = daemon.log_events("grace period over: cancelling runs in progress")[0]
    assert waited["grace_s"] == grace_s
    assert _seconds_between(waited["timestamp"], cancelled["timestamp"]) >= grace_s * 0.95

    rows = await fetch_all(
        engine, "SELECT tenant, status, error FROM syncd.sync_runs ORDER BY tenant"
    )
    assert [row[:2] for row in rows] == [("tenant-1", "failed"), ("tenant-2", "succeeded")]
    assert "interrupted" in rows[0][2]
    assert await _running_rows(engine) == []
    # No claim is left behind: the interrupted tenant is still due (another replica runs it
    # at once), the finished one due in an hour; tenant-3 was never claimed.
    schedule = await fetch_all(
        engine,
        "SELECT t.name, s.claimed_by, s.due_at <= now() FROM syncd.schedule s "
        "JOIN syncd.tenants t ON t.id = s.tenant_id ORDER BY t.name",
    )
    assert schedule == [("tenant-1", None, True), ("tenant-2", None, False)]
    _assert_clean_logs(daemon, [t.api_key for t in sim_state.tenants.values()])
    assert daemon.log_events("grace period over: cancelling runs in progress")


async def test_a_second_stop_signal_exits_at_once(
    tmp_path: Path, db_url: str, sim_state: sim.SimulatorState, simulator: str
) -> None:
    sim_state.inject(sim.Fault(kind="latency", tenant="tenant-1", delay_s=60.0, times=None))
    config_path = tmp_path / "syncd.toml"
    write_config(
        config_path,
        database_url=db_url,
        simulator_url=simulator,
        tenants=[sim_state.tenants["tenant-1"]],
        sync={"interval": "1h", "request_timeout": "2m"},
        daemon={"shutdown_grace": "60s"},
    )
    async with running_daemon(config_path) as daemon:

        async def running() -> bool:
            row = (await daemon.tenant_status()).get("tenant-1")
            return row is not None and row["running"]

        await wait_for(running, timeout_s=5.0, what="tenant-1 running")
        daemon.send(signal.SIGTERM)
        await daemon.wait_for_log("waiting for runs in progress")
        daemon.send(signal.SIGINT)
        # At once: not after the 60 s grace the first signal started.
        assert await daemon.wait_exit(30.0) == 128 + signal.SIGINT
        assert daemon.log_events("second stop signal: exiting at once")


async def test_sighup_reloads_tenants_and_rejects_an_invalid_config(
    tmp_path: Path, db_url: str, sim_state: sim.SimulatorState, simulator: str
) -> None:
    tenants = sim_state.tenants
    config_path = tmp_path / "syncd.toml"

    def write(names: list[str]) -> None:
        write_config(
            config_path,
            database_url=db_url,
            simulator_url=simulator,
            tenants=[tenants[name] for name in names],
        )

    write(["tenant-1", "tenant-2"])
    async with running_daemon(config_path) as daemon:
        await daemon.wait_runs("tenant-1", 1)
        await daemon.wait_runs("tenant-2", 1)
        assert await daemon.runs("tenant-3") == 0

        readable = "the config file is readable by other users and syncd holds secrets in it"
        assert not [line for line in daemon.logs() if readable in str(line.get("event"))]
        write(["tenant-2", "tenant-3"])
        config_path.chmod(0o644)  # permissions are re-checked on reload
        daemon.send(signal.SIGHUP)
        await daemon.wait_runs("tenant-3", 1, timeout_s=5.0)
        reloaded = await daemon.wait_for_log("configuration reloaded")
        assert (reloaded["added"], reloaded["removed"]) == (["tenant-3"], ["tenant-1"])
        warned = [line for line in daemon.logs() if readable in str(line.get("event"))]
        assert len(warned) == 1 and warned[0]["path"] == str(config_path)
        assert set(await daemon.tenant_status()) == {"tenant-2", "tenant-3"}
        assert (await daemon.metrics()).value("syncd_pairs_current", tenant="tenant-1") is None

        config_path.write_text(
            config_path.read_text().replace('interval = "1s"', 'interval = "soon"')
        )
        daemon.send(signal.SIGHUP)
        rejected = await daemon.wait_for_log(
            "configuration rejected; the running one stays in force"
        )
        assert any("sync.interval" in problem for problem in rejected["problems"])
        assert rejected["level"] == "error"
        before = {name: await daemon.runs(name) for name in ("tenant-2", "tenant-3")}
        for name, count in before.items():
            await daemon.wait_runs(name, int(count) + 2, timeout_s=5.0)
        metrics = await daemon.metrics()
        assert metrics.value("syncd_config_reloads_total", result="rejected") == 1
        assert metrics.value("syncd_config_reloads_total", result="applied") == 1
        assert set(await daemon.tenant_status()) == {"tenant-2", "tenant-3"}

        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(10.0) == 0
    _assert_clean_logs(daemon, [t.api_key for t in tenants.values()])


async def test_unreachable_database_at_start_is_not_ready_but_alive(
    tmp_path: Path, sim_state: sim.SimulatorState, simulator: str
) -> None:
    config_path = tmp_path / "syncd.toml"
    write_config(
        config_path,
        database_url=f"postgresql://syncd:db-password-s3cret@127.0.0.1:{_closed_port()}/syncd",
        simulator_url=simulator,
        tenants=[sim_state.tenants["tenant-1"]],
    )
    async with running_daemon(config_path) as daemon:
        body = await daemon.wait_not_ready("cannot reach the database")
        assert body["checks"]["database"] != "ok"

        # It keeps retrying (with backoff) and keeps serving, rather than crash-looping.
        async def checked_again() -> bool:
            failed = (await daemon.metrics()).value("syncd_database_checks_total", result="failed")
            return failed is not None and failed >= 3

        await wait_for(checked_again, timeout_s=20.0, what="three failed database checks")
        assert daemon.process.returncode is None
        assert (await daemon.get("/healthz"))[0] == 200
        assert (await daemon.get("/readyz"))[0] == 503
        row = (await daemon.tenant_status())["tenant-1"]
        assert row["last_run_at"] is None
        assert "cannot reach the database" in row["waiting_for"]
        assert sim_state.in_flight["tenant-1"] == 0 and not sim_state.request_log

        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(10.0) == 0
    _assert_clean_logs(daemon, ["db-password-s3cret", sim_state.tenants["tenant-1"].api_key])


async def test_database_lost_while_running_makes_it_not_ready_until_it_returns(
    tmp_path: Path,
    db_url: str,
    pg_server_url: str,
    sim_state: sim.SimulatorState,
    simulator: str,
) -> None:
    name = make_url(db_url).database
    config_path = tmp_path / "syncd.toml"
    write_config(
        config_path,
        database_url=db_url,
        simulator_url=simulator,
        tenants=[sim_state.tenants["tenant-1"], sim_state.tenants["tenant-2"]],
    )
    async with running_daemon(config_path) as daemon, admin_connection(pg_server_url) as admin:
        await daemon.wait_runs("tenant-1", 1)
        await daemon.wait_runs("tenant-2", 1)
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                name,
            )

            body = await daemon.wait_not_ready("database", timeout_s=8.0)
            assert body["checks"]["database"] != "ok"
            assert (await daemon.get("/healthz"))[0] == 200
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

        async def ready() -> bool:
            return (await daemon.get("/readyz"))[0] == 200

        await wait_for(ready, timeout_s=10.0, what="/readyz to say 200 again")
        before = await daemon.runs("tenant-1")
        await daemon.wait_runs("tenant-1", int(before) + 1, timeout_s=5.0)
        # The database's outage is not held against the tenants: no backoff for them.
        rows = await daemon.tenant_status()
        assert [rows[t]["consecutive_failures"] for t in ("tenant-1", "tenant-2")] == [0, 0]
        assert daemon.log_events("database ready")

        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(10.0) == 0
    _assert_clean_logs(daemon, [t.api_key for t in sim_state.tenants.values()])


async def test_schema_behind_is_not_ready_naming_migrate_until_migrated(
    tmp_path: Path, empty_db_url: str, sim_state: sim.SimulatorState, simulator: str
) -> None:
    config_path = tmp_path / "syncd.toml"
    write_config(
        config_path,
        database_url=empty_db_url,
        simulator_url=simulator,
        tenants=[sim_state.tenants["tenant-1"]],
    )
    async with running_daemon(config_path) as daemon:
        body = await daemon.wait_not_ready("syncd migrate")
        assert body["checks"]["database"] == "ok"
        assert "syncd migrate" in body["checks"]["schema"]
        assert await daemon.runs("tenant-1") == 0

        async with db.open_engine(empty_db_url, pool_size=1) as engine:
            await db.migrate(engine)
        # Re-checked with backoff; once at head, the skipped first run happens soon.
        await daemon.wait_runs("tenant-1", 1, timeout_s=10.0)
        assert (await daemon.get("/readyz"))[0] == 200

        daemon.send(signal.SIGTERM)
        assert await daemon.wait_exit(10.0) == 0


async def test_status_and_gauges_survive_a_restart(
    tmp_path: Path,
    db_url: str,
    sim_state: sim.SimulatorState,
    simulator: str,
) -> None:
    from syncd.sync import sync_tenant
    from tests.fixtures.helpers import tenant_for

    async with db.open_engine(db_url) as engine:
        earlier = await sync_tenant(tenant_for(sim_state.tenants["tenant-1"], simulator), engine)
    assert earlier.status == "succeeded"
    # The restarted daemon's first run is slow, so what /status shows meanwhile is what it
    # read from the database at start, not the result of a run of its own.
    sim_state.inject(sim.Fault(kind="latency", tenant="tenant-1", delay_s=8.0, offset=0))
    config_path = tmp_path / "syncd.toml"
    write_config(
        config_path,
        database_url=db_url,
        simulator_url=simulator,
        tenants=[sim_state.tenants["tenant-1"]],
        sync={"interval": "1h"},
    )
    async with running_daemon(config_path) as daemon:

        async def seeded() -> dict[str, Any] | None:
            # /status lists tenants once the scheduler is up, a moment after the endpoint.
            row = (await daemon.tenant_status()).get("tenant-1")
            return row if row is not None and row["last_status"] is not None else None

        row = await wait_for(seeded, timeout_s=5.0, what="tenant-1's stored status")
        assert (row["last_status"], row["pairs"]) == ("succeeded", 300)
        # The stored run, by this test's process: not a run of the daemon's own.
        assert (row["last_run_id"], row["last_replica"]) == (
            earlier.run_id,
            config.default_replica_name(),
        )
        assert row["collections"]["jobs"]["status"] == "succeeded"  # read from the database
        assert row["last_success_at"] is not None
        metrics = await daemon.metrics()
        assert metrics.value("syncd_pairs_current", tenant="tenant-1") == 300
        last_success = metrics.value("syncd_last_success_timestamp_seconds", tenant="tenant-1")
        assert last_success is not None
        assert abs(last_success - datetime.fromisoformat(row["last_success_at"]).timestamp()) < 1
        assert await daemon.runs("tenant-1") == 0


# --- in-process: the daemon without its process ----------------------------------------------


async def test_in_process_daemon_serves_status_metrics_and_reloads(
    tmp_path: Path, sim_state: sim.SimulatorState, simulator: str, engine: AsyncEngine
) -> None:
    config_path = tmp_path / "syncd.toml"
    tenants = sim_state.tenants
    write_config(
        config_path,
        database_url="postgresql://unused@127.0.0.1:1/unused",  # serve() is given the engine
        simulator_url=simulator,
        tenants=[tenants["tenant-1"]],
    )
    async with (
        serving_daemon(config_path, engine) as (daemon, base_url),
        aiohttp.ClientSession() as session,
    ):

        async def synced() -> dict[str, Any] | None:
            async with session.get(base_url + "/status") as response:
                body = await response.json()
            rows = {row["tenant"]: row for row in body["tenants"]}
            row = rows.get("tenant-1")
            return body if row is not None and row["last_status"] == "succeeded" else None

        body = await wait_for(synced, timeout_s=20.0, what="tenant-1 synced")
        row = body["tenants"][0]
        assert body["ready"] is True
        assert (row["configured"], row["ok"], row["pairs"]) == (True, True, 300)
        assert row["age_s"] is not None and row["schedule"] == "every 1s"
        async with session.get(base_url + "/metrics") as response:
            scraped = Metrics(await response.text())
        assert scraped.value("syncd_ready") == 1.0
        assert scraped.value("syncd_pairs_current", tenant="tenant-1") == 300

        write_config(
            config_path,
            database_url="postgresql://unused@127.0.0.1:1/unused",
            simulator_url=simulator,
            tenants=[tenants["tenant-1"], tenants["tenant-2"]],
        )
        daemon.reload()

        async def both() -> bool:
            return {row["tenant"] for row in daemon.tenants()} == {"tenant-1", "tenant-2"}

        await wait_for(both, timeout_s=10.0, what="tenant-2 scheduled after reload")
