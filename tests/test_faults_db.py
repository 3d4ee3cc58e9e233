"""PostgreSQL failing under a run: killed connections, statement timeouts, a full disk, a
server that is down when syncd starts. Each: the run's status and message, the data left
(never a half-applied snapshot), and a clean next run.

Runs are stopped at a precise phase with locks held by the test, never with sleeps: a row
lock on the tenant's `syncd.tenants` row stops a run inside its apply transaction (its last
statement updates that row, after the link writes); `LOCK TABLE syncd.links` stops it at the
first link write.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from syncd import db, sync
from syncd import simulator as sim
from syncd.sync import SyncResult, sync_tenant
from tests.fixtures.database import admin
from tests.fixtures.fault_helpers import (
    assert_history_sound,
    run_cli,
    run_row,
    scalar,
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

TENANT = "tenant-1"


async def _sync(
    state: sim.SimulatorState, url: str, engine: AsyncEngine, **kw: object
) -> SyncResult:
    return await sync_tenant(tenant_for(state.tenants[TENANT], url, **kw), engine)


async def _baseline_then_churn(
    state: sim.SimulatorState, url: str, engine: AsyncEngine, check: AsyncEngine
) -> set[tuple[str, str | None, str]]:
    """A clean first sync, then churn in VSPC; returns what the database holds (S0)."""
    assert (await _sync(state, url, engine)).status == "succeeded"
    state.remove_pairs(TENANT, 4)
    state.add_pairs(TENANT, 3)
    return await current_pairs(check, TENANT)


async def _blocked_backend(engine: AsyncEngine, query_prefix: str) -> int | None:
    """The pid of the sync's backend if it waits on a lock in a query starting so."""
    rows = await fetch_all(
        engine,
        "SELECT pid, query FROM pg_stat_activity WHERE application_name = :app "
        "AND datname = current_database() AND wait_event_type = 'Lock'",
        app=SYNC_APPLICATION_NAME,
    )
    for pid, query in rows:
        if query.lstrip().startswith(query_prefix):
            return int(pid)
    return None


@contextlib.asynccontextmanager
async def _holding(engine: AsyncEngine, statement: str) -> AsyncIterator[AsyncConnection]:
    """Runs `statement` in a transaction kept open (its locks held) for the block."""
    async with engine.connect() as connection:
        transaction = await connection.begin()
        await connection.execute(sa.text(statement))
        try:
            yield connection
        finally:
            await transaction.rollback()


def _assert_readable(error: str | None) -> None:
    """The message an operator reads (and `sync_runs.error` keeps): no SQL statement dump."""
    assert error is not None
    assert "[SQL:" not in error and "[parameters:" not in error, error


async def _heal(
    state: sim.SimulatorState, url: str, engine: AsyncEngine, check: AsyncEngine
) -> None:
    healed = await _sync(state, url, engine)
    assert healed.status == "succeeded", healed.error
    assert await current_pairs(check, TENANT) == expected_pairs(state.tenants[TENANT])
    await assert_history_sound(check)


async def test_connection_killed_inside_the_apply_transaction(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    s0 = await _baseline_then_churn(sim_state, simulator, sync_engine, engine)
    lock = f"SELECT id FROM syncd.tenants WHERE name = '{TENANT}' FOR NO KEY UPDATE"
    async with _holding(engine, lock):
        task = asyncio.create_task(_sync(sim_state, simulator, sync_engine))
        pid = await wait_for(
            lambda: _blocked_backend(engine, "WITH tenant AS"),
            what="the run to reach its last apply statement",
        )
        # The link writes are done but not committed: nobody else sees them.
        assert await current_pairs(engine, TENANT) == s0
        killed = await fetch_all(engine, "SELECT pg_terminate_backend(:pid)", pid=pid)
        assert killed == [(True,)]
        result = await asyncio.wait_for(task, 30)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.startswith("database failure: ")
    assert "terminating connection due to administrator command" in result.error
    _assert_readable(result.error)
    assert await run_row(engine, result.run_id) == ("failed", result.error, True)
    assert await current_pairs(engine, TENANT) == s0
    await assert_history_sound(engine)
    await _heal(sim_state, simulator, sync_engine, engine)


async def test_connection_killed_while_fetching(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    s0 = await _baseline_then_churn(sim_state, simulator, sync_engine, engine)
    sim_state.inject(sim.Fault(kind="latency", tenant=TENANT, delay_s=0.05, times=None))
    task = asyncio.create_task(_sync(sim_state, simulator, sync_engine, max_concurrent_pages=1))

    async def fetching_backend() -> int | None:
        if not sim_state.in_flight[TENANT]:
            return None
        rows = await fetch_all(
            engine,
            "SELECT pid FROM pg_stat_activity WHERE application_name = :app "
            "AND datname = current_database()",
            app=SYNC_APPLICATION_NAME,
        )
        return int(rows[0][0]) if len(rows) == 1 else None

    pid = await wait_for(fetching_backend, what="the run to fetch pages")
    assert await fetch_all(engine, "SELECT pg_terminate_backend(:pid)", pid=pid) == [(True,)]
    result = await asyncio.wait_for(task, 30)
    assert result.status == "failed"
    assert result.error is not None and result.error.startswith("database failure: ")
    assert await run_row(engine, result.run_id) == ("failed", result.error, True)
    assert await current_pairs(engine, TENANT) == s0
    await assert_history_sound(engine)
    sim_state.clear_faults()
    await _heal(sim_state, simulator, sync_engine, engine)


async def test_statement_timeout_while_apply_waits_for_a_lock(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, engine: AsyncEngine
) -> None:
    async with db.open_engine(
        db_url, application_name=SYNC_APPLICATION_NAME, statement_timeout_s=0.3
    ) as timed:
        s0 = await _baseline_then_churn(sim_state, simulator, timed, engine)
        # A reporting job holding a table lock: reads (the diff's count) go on, writes wait.
        async with _holding(engine, "LOCK TABLE syncd.links IN EXCLUSIVE MODE"):
            result = await asyncio.wait_for(_sync(sim_state, simulator, timed), 30)
        assert result.status == "failed"
        assert result.error is not None and result.error.startswith("database failure: ")
        assert result.error == (
            "database failure: QueryCanceledError: canceling statement due to statement timeout"
        )
        assert await run_row(engine, result.run_id) == ("failed", result.error, True)
        assert await current_pairs(engine, TENANT) == s0
        await assert_history_sound(engine)
        await _heal(sim_state, simulator, timed, engine)


def test_a_sub_millisecond_statement_timeout_still_limits_statements() -> None:
    # "0.4ms" is a valid duration; PostgreSQL takes whole milliseconds and 0 means "none".
    assert db.statement_timeout_setting(0.0004) == "1"
    assert db.statement_timeout_setting(0.0) == "1"
    assert db.statement_timeout_setting(600.0) == "600000"


async def test_the_statement_timeout_reaches_every_connection(db_url: str) -> None:
    # 50 ms, not 1: a loaded machine can take a millisecond for the driver's own first query.
    async with db.open_engine(db_url, statement_timeout_s=0.05) as engine:
        assert await scalar(engine, "SHOW statement_timeout") == "50ms"
        with pytest.raises(sa.exc.DBAPIError, match="statement timeout"):
            await scalar(engine, "SELECT pg_sleep(2)")


@pytest.mark.parametrize(
    "lock",
    [
        "LOCK TABLE syncd.tenants IN ACCESS EXCLUSIVE MODE",  # the tenant is looked up first
        "LOCK TABLE syncd.runs IN SHARE MODE",  # then abandoned runs are closed
    ],
)
async def test_database_failure_before_the_run_is_recorded(
    lock: str, sim_state: sim.SimulatorState, simulator: str, db_url: str, engine: AsyncEngine
) -> None:
    async with db.open_engine(
        db_url, application_name=SYNC_APPLICATION_NAME, statement_timeout_s=0.2
    ) as timed:
        s0 = await _baseline_then_churn(sim_state, simulator, timed, engine)
        async with _holding(engine, lock):
            # The documented contract: sync_tenant returns a failed result that says the
            # database failed (so a scheduler retries soon), never a raw driver error.
            failed = await asyncio.wait_for(_sync(sim_state, simulator, timed), 30)
        assert failed.status == "failed" and failed.database_failure and failed.run_id is None
        assert failed.error is not None and "statement timeout" in failed.error
        assert await current_pairs(engine, TENANT) == s0
        await assert_history_sound(engine)
        # The advisory lock was released: the next run is not skipped as busy.
        await _heal(sim_state, simulator, timed, engine)


async def test_sync_against_an_unreachable_database_returns_a_database_failure(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    port = _free_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/syncd"
    async with db.open_engine(url, connect_timeout_s=2) as down:
        failed = await _sync(sim_state, simulator, down)
    assert failed.status == "failed" and failed.database_failure
    assert failed.error is not None and "cannot reach the database" in failed.error


# --- database down when `syncd sync` starts, then back ----------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def _tcp_proxy(port: int, target_url: str) -> AsyncIterator[None]:
    """Forwards 127.0.0.1:`port` to the PostgreSQL server of `target_url` (TCP or socket)."""
    target = make_url(target_url)
    socket_dir = target.query.get("host")

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if target.host:
            return await asyncio.open_connection(target.host, target.port or 5432)
        assert isinstance(socket_dir, str)
        return await asyncio.open_unix_connection(
            os.path.join(socket_dir, f".s.PGSQL.{target.port or 5432}")
        )

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await connect()
        for task in (
            asyncio.create_task(pipe(reader, upstream_writer)),
            asyncio.create_task(pipe(upstream_reader, writer)),
        ):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@pytest.mark.slow
async def test_database_down_at_start_then_back(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    port = _free_port()
    database = make_url(db_url).database
    assert database is not None
    proxied_url = f"postgresql://postgres@127.0.0.1:{port}/{database}"
    path = write_config(
        tmp_path,
        proxied_url,
        [tenant_block(sim_state.tenants[TENANT], simulator)],
        database='connect_timeout = "2s"\n',
    )

    for command in ("sync", "migrate"):
        down = await run_cli("--config", str(path), command)
        assert down.code == 1, down.output
        assert "syncd: error: cannot reach the database" in down.stderr, down.stderr
        assert "Traceback" not in down.output
    assert await current_pairs(engine, TENANT) == set()

    async with _tcp_proxy(port, db_url):
        back = await run_cli("--config", str(path), "sync")
    assert back.code == 0, back.output
    assert "succeeded" in back.stdout
    assert await current_pairs(engine, TENANT) == expected_pairs(sim_state.tenants[TENANT])
    await assert_history_sound(engine)


# --- a full disk --------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyDisk:
    """A PostgreSQL tablespace on a tmpfs of a few hundred KB: writes there hit a real ENOSPC."""

    tablespace: str
    mount_point: Path

    async def grow(self, size: str = "64m") -> None:
        """What an operator does about a full disk: make room."""
        command = ["mount", "-o", f"remount,size={size}", str(self.mount_point)]
        await asyncio.to_thread(subprocess.run, command, check=True)


@pytest.fixture
async def tiny_disk(pg_server_url: str) -> AsyncIterator[TinyDisk]:
    """Needs root, permission to mount, and the PostgreSQL server on this machine; skips
    otherwise. Request it before `db_url`, so the test database is dropped first."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a tmpfs mount: needs root")
    data_directory = await admin(pg_server_url, "SHOW data_directory")
    if not isinstance(data_directory, str) or not await asyncio.to_thread(
        os.path.isdir, data_directory
    ):
        pytest.skip("the PostgreSQL server is not on this machine")
    owner = (await asyncio.to_thread(os.stat, data_directory)).st_uid
    # Under /tmp itself: the server's user must be able to reach the mount point.
    mount_point = Path(tempfile.mkdtemp(prefix="syncd-tiny-disk-", dir="/tmp"))
    await asyncio.to_thread(mount_point.chmod, 0o755)
    mounted = await asyncio.to_thread(
        subprocess.run,
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size=256k,mode=0700,uid={owner}",
            "tmpfs",
            str(mount_point),
        ],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        await asyncio.to_thread(mount_point.rmdir)
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    name = f"syncd_tiny_{os.getpid()}"
    try:
        await admin(pg_server_url, f"CREATE TABLESPACE {name} LOCATION '{mount_point}'")
        yield TinyDisk(name, mount_point)
    finally:
        with contextlib.suppress(asyncpg.PostgresError):
            await admin(pg_server_url, f"DROP TABLESPACE IF EXISTS {name}")
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(mount_point)], check=False)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(mount_point.rmdir)


@pytest.mark.parametrize("where", ["links", "staging"])
async def test_disk_full(
    where: str,
    tiny_disk: TinyDisk,
    db_url: str,
    sim_state: sim.SimulatorState,
    simulator: str,
    engine: AsyncEngine,
) -> None:
    database = make_url(db_url).database
    async with engine.begin() as connection:
        if where == "links":
            # The durable table on the small disk: the apply's INSERT runs out of space.
            await connection.execute(
                sa.text(f"ALTER TABLE syncd.links SET TABLESPACE {tiny_disk.tablespace}")
            )
        else:
            # Temporary tables (the staging table) on the small disk: the COPY runs out.
            await connection.execute(
                sa.text(
                    f"ALTER DATABASE {database} SET temp_tablespaces = '{tiny_disk.tablespace}'"
                )
            )
    async with db.open_engine(db_url, application_name=SYNC_APPLICATION_NAME) as sync_engine:
        s0 = await _baseline_then_churn(sim_state, simulator, sync_engine, engine)
        sim_state.add_pairs(TENANT, 5000)  # ~400 KB of rows: more than the disk holds
        result = await _sync(sim_state, simulator, sync_engine, page_size=500)
        assert result.status == "failed", result.error
        assert result.error is not None and result.error.startswith("database failure: ")
        assert "No space left on device" in result.error
        _assert_readable(result.error)
        assert await run_row(engine, result.run_id) == ("failed", result.error, True)
        assert await current_pairs(engine, TENANT) == s0
        await assert_history_sound(engine)

        await tiny_disk.grow()
        healed = await _sync(sim_state, simulator, sync_engine, page_size=500)
        assert healed.status == "succeeded", healed.error
        assert await current_pairs(engine, TENANT) == expected_pairs(sim_state.tenants[TENANT])
        await assert_history_sound(engine)
    # Leave nothing on the tablespace, so that it can be dropped.
    async with engine.begin() as connection:
        await connection.execute(sa.text("ALTER TABLE syncd.links SET TABLESPACE pg_default"))
        await connection.execute(sa.text(f"ALTER DATABASE {database} RESET temp_tablespaces"))


async def test_pooled_connections_the_server_closed_are_replaced_without_a_ping(
    db_url: str, engine: AsyncEngine
) -> None:
    # The pool does not ping (three round trips per checkout); a connection the server
    # closed while it sat in the pool must still never be handed out.
    async with db.open_engine(db_url, application_name=SYNC_APPLICATION_NAME) as pooled:
        async with pooled.connect() as connection:
            before = await connection.scalar(sa.text("SELECT pg_backend_pid()"))
        killed = await fetch_all(engine, "SELECT pg_terminate_backend(:pid)", pid=before)
        assert killed == [(True,)]

        async def gone() -> bool | None:
            rows = await fetch_all(
                engine, "SELECT 1 FROM pg_stat_activity WHERE pid = :pid", pid=before
            )
            return True if not rows else None

        await wait_for(gone, what="the backend to exit")
        await asyncio.sleep(0.05)  # the close reaches the idle connection's reader
        async with pooled.connect() as connection:
            after = await connection.scalar(sa.text("SELECT pg_backend_pid()"))
        assert after != before


async def test_sync_sessions_commit_without_waiting_for_the_wal_flush(db_url: str) -> None:
    for synchronous, expected in ((True, "on"), (False, "off")):
        async with (
            db.open_engine(db_url, synchronous_commit=synchronous) as engine,
            engine.connect() as connection,
        ):
            setting = await connection.scalar(sa.text("SHOW synchronous_commit"))
        assert setting == expected


async def test_runs_beyond_max_concurrent_applies_wait_their_turn(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    tenants = [
        tenant_for(sim_state.tenants[name], simulator, run_timeout="2s")
        for name in sorted(sim_state.tenants)
    ]
    assert len(tenants) >= 3
    # A reporting job's lock holds the first run's apply until run_timeout stops it; the
    # others fetch and stage, then wait for its slot (not on the table) until theirs.
    async with _holding(engine, "LOCK TABLE syncd.links IN EXCLUSIVE MODE"):
        results = await asyncio.wait_for(
            sync.sync_tenants(
                tenants, sync_engine, max_concurrent_tenants=len(tenants), max_concurrent_applies=1
            ),
            30,
        )
    errors = sorted(result.error or "" for result in results)
    assert [result.status for result in results] == ["failed"] * len(tenants)
    assert all("longer than run_timeout (2s)" in error for error in errors), errors
    waited = [error for error in errors if "waited" in error]
    assert len(waited) == len(tenants) - 1, errors
    assert all("raise [database] max_concurrent_applies" in error for error in waited)
    healed = await sync.sync_tenants(tenants, sync_engine, max_concurrent_tenants=len(tenants))
    assert [result.status for result in healed] == ["succeeded"] * len(tenants)
    for tenant in tenants:
        assert await current_pairs(engine, tenant.name) == expected_pairs(
            sim_state.tenants[tenant.name]
        )


@pytest.mark.parametrize("idle_s, pinged", [(60.0, False), (0.0, True)])
async def test_a_connection_idle_long_is_pinged_before_use(
    db_url: str, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, idle_s: float, pinged: bool
) -> None:
    # A flow cut by a NAT or load balancer while idle looks alive to the driver: only a
    # round trip shows it, so one is spent on connections idle longer than the threshold.
    monkeypatch.setattr(db, "PING_IDLE_AFTER_S", idle_s)
    async with db.open_engine(db_url, pool_size=1) as pooled:
        async with db.autocommit(pooled) as connection:
            pid = await connection.scalar(sa.text("SELECT pg_backend_pid() /* marker */"))
        async with db.autocommit(pooled) as connection:
            rows = await fetch_all(
                engine, "SELECT query FROM pg_stat_activity WHERE pid = :pid", pid=pid
            )
            assert await connection.scalar(sa.text("SELECT pg_backend_pid()")) == pid
    last_statement = rows[0][0]
    assert ("marker" not in last_statement) is pinged, last_statement
