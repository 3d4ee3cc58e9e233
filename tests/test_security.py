"""Security properties, checked end to end through the CLI and the database.

- Secrets (API keys, passwords, the database password, every access and refresh token
  VSPC issued) appear nowhere: not in logs at debug level, not in CLI output, not in
  error messages, not in the database (a `pg_dump` of it).
- TLS is verified by default; `verify_tls = false` works but logs a warning.
- A config file holding secrets and readable by others is warned about.
- Tenant names reach SQL only as parameters.
- The simulator listens on the loopback interface unless told otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa
import trustme
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import config
from syncd import simulator as sim
from tests.fixtures.fault_helpers import (
    CliResult,
    assert_history_sound,
    run_cli,
    start_cli,
    summary_rows,
    tenant_block,
    toml_string,
    wait_for,
    write_config,
)
from tests.fixtures.helpers import current_pairs, expected_pairs, fetch_all

pytestmark = pytest.mark.slow  # real `syncd` processes

DB_PASSWORD = "Db-Pa55-7f3c91e2"
WRONG_PASSWORD = "Wrong-Pa55-0b8d2a44"
WRONG_API_KEY = "wrong-key-5e1f7c0a9d3b"


def _with_password(url: str, password: str) -> str:
    return make_url(url).set(password=password).render_as_string(hide_password=False)


async def _database_dump(db_url: str, engine: AsyncEngine) -> str:
    """The whole database as text: `pg_dump` when it works here, else every syncd row."""
    pg_dump = shutil.which("pg_dump", path=f"{os.environ.get('PATH', '')}:/usr/bin")
    if pg_dump is not None:
        process = await asyncio.create_subprocess_exec(
            pg_dump,
            "--dbname",
            _with_password(db_url, DB_PASSWORD),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, _ = await process.communicate()
        if process.returncode == 0 and b"syncd" in stdout:
            return stdout.decode()
    tables = await fetch_all(
        engine,
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_schema = 'syncd'",
    )
    dumped = []
    for schema, table in tables:
        rows = await fetch_all(engine, f'SELECT t::text FROM "{schema}"."{table}" t')
        dumped += [row[0] for row in rows]
    return "\n".join(dumped)


async def test_no_secret_in_logs_output_errors_or_database(
    sim_state: sim.SimulatorState,
    simulator: str,
    db_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
) -> None:
    # Tokens die mid-snapshot and one is refused outright: grants, refreshes and renewals
    # all happen, so every token-handling path logs what it logs.
    sim_state.token_lifetime_s = 0.3
    sim_state.inject(sim.Fault(kind="latency", delay_s=0.05, times=None))
    sim_state.inject(sim.Fault(kind="401", tenant="tenant-3", offset=98, times=1))
    t1, t2, t3 = (sim_state.tenants[name] for name in ("tenant-1", "tenant-2", "tenant-3"))
    blocks = [
        tenant_block(t1, simulator, password=True, max_concurrent_pages=1),
        tenant_block(t2, simulator),
        tenant_block(t3, simulator, password=True),
        '[[tenants]]\nname = "wrong-password"\n'
        f"url = {toml_string(simulator)}\nusername = {toml_string(t1.username)}\n"
        f"password = {toml_string(WRONG_PASSWORD)}\n",
        f'[[tenants]]\nname = "wrong-key"\nurl = {toml_string(simulator)}\n'
        f"api_key = {toml_string(WRONG_API_KEY)}\n",
    ]
    path = write_config(tmp_path, _with_password(db_url, DB_PASSWORD), blocks)
    results: list[CliResult] = [
        await run_cli("--log-level", "debug", "--config", str(path), "sync")
    ]
    sync = results[0]
    assert sync.code == 1, sync.output  # the two wrong credentials fail, the rest succeed
    rows = summary_rows(sync.stdout)
    assert "credentials refused" in rows["wrong-password"], sync.stdout
    assert "the API key was refused" in rows["wrong-key"], sync.stdout
    for name in ("tenant-1", "tenant-2", "tenant-3"):
        assert await current_pairs(engine, name) == expected_pairs(sim_state.tenants[name])
    # The paths under test were taken: password grants, refreshes, a renewal after a 401.
    assert sim_state.token_grants["password"] >= 2
    assert sim_state.token_grants["refresh_token"] >= 1
    assert sim_state.requests_by_status[401] >= 1
    assert len(sim_state.issued_tokens) >= 8

    sim_state.clear_faults()
    for command in (["check"], ["status"], ["status", "--json"]):
        results.append(await run_cli("--log-level", "debug", "--config", str(path), *command))
    assert results[1].code == 1, results[1].output
    assert "credentials refused" in results[1].stdout  # check's details are not wrapped
    # status: 1 because the two tenants with wrong credentials failed their last run.
    assert results[2].code == 1 and "wrong-password" in results[2].stdout
    assert results[3].code == 1 and json.loads(results[3].stdout)["ok"] is False

    secrets = {
        "tenant-1 password": t1.password,
        "tenant-3 password": t3.password,
        "tenant-2 API key": t2.api_key,
        "wrong password": WRONG_PASSWORD,
        "wrong API key": WRONG_API_KEY,
        "database password": DB_PASSWORD,
        **{f"issued token {i}": token for i, token in enumerate(sim_state.issued_tokens)},
    }
    dump = await _database_dump(db_url, engine)
    assert "tenant-1" in dump and "credentials refused" in dump  # it is the real data
    for where, text in [
        *((f"output of syncd {i}", result.output) for i, result in enumerate(results)),
        ("the database", dump),
    ]:
        leaked = [what for what, secret in secrets.items() if secret in text]
        assert leaked == [], f"{leaked} found in {where}"
    # Debug logging really was on (else this test proves little).
    assert '"level": "debug"' in sync.stderr and "vspc request" in sync.stderr


@pytest.fixture
async def tls_simulator(
    sim_state: sim.SimulatorState, tmp_path: Path
) -> AsyncIterator[tuple[str, Path]]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    async with sim.run_simulator(sim_state, ssl_context=server_context) as url:
        yield url, ca_path


def _log_records(stderr: str) -> list[dict[str, object]]:
    records = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


async def test_tls_is_verified_by_default_and_turning_it_off_is_loud(
    sim_state: sim.SimulatorState,
    tls_simulator: tuple[str, Path],
    db_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
) -> None:
    url, ca_path = tls_simulator
    tenant = sim_state.tenants["tenant-1"]
    path = write_config(tmp_path, db_url, [tenant_block(tenant, url)])
    assert config.load_config(path).tenant("tenant-1").verify_tls is True

    default = await run_cli("--config", str(path), "sync")
    assert default.code == 1, default.output
    row = summary_rows(default.stdout)["tenant-1"]
    assert "is not trusted" in row and "set ca_file" in row, default.stdout
    assert await current_pairs(engine, "tenant-1") == set()
    assert not any("TLS verification disabled" in line for line in default.stderr.splitlines())

    insecure_path = write_config(
        tmp_path, db_url, [tenant_block(tenant, url, verify_tls=False)], name="insecure.toml"
    )
    insecure = await run_cli("--config", str(insecure_path), "sync")
    assert insecure.code == 0, insecure.output
    warnings = [
        record
        for record in _log_records(insecure.stderr)
        if "TLS verification disabled" in str(record["event"])
    ]
    assert warnings and all(record["level"] == "warning" for record in warnings), insecure.stderr
    assert "tenant-1" in str(warnings[0]["event"])

    trusted_path = write_config(
        tmp_path, db_url, [tenant_block(tenant, url, ca_file=str(ca_path))], name="ca.toml"
    )
    trusted = await run_cli("--config", str(trusted_path), "sync")
    assert trusted.code == 0, trusted.output
    assert "TLS verification disabled" not in trusted.stderr
    assert await current_pairs(engine, "tenant-1") == expected_pairs(tenant)


READABLE_WARNING = "the config file is readable by other users and syncd holds secrets in it"


async def test_a_config_with_secrets_readable_by_others_is_warned_about(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, tmp_path: Path
) -> None:
    blocks = [tenant_block(sim_state.tenants["tenant-1"], simulator)]
    loose = write_config(tmp_path, db_url, blocks, mode=0o644)
    warned = await run_cli("--config", str(loose), "sync")
    assert warned.code == 0, warned.output
    records = [r for r in _log_records(warned.stderr) if READABLE_WARNING in str(r["event"])]
    assert len(records) == 1 and records[0]["level"] == "warning", warned.stderr
    assert records[0]["path"] == str(loose)

    tight = write_config(tmp_path, db_url, blocks, mode=0o600, name="tight.toml")
    quiet = await run_cli("--config", str(tight), "sync")
    assert quiet.code == 0 and READABLE_WARNING not in quiet.stderr


async def test_the_readable_warning_is_about_the_file_that_holds_the_secret(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, tmp_path: Path
) -> None:
    tenant = sim_state.tenants["tenant-1"]
    key_file = tmp_path / "tenant-1.key"
    key_file.write_text(tenant.api_key + "\n")
    key_file.chmod(0o600)
    block = (
        f'[[tenants]]\nname = "tenant-1"\nurl = {toml_string(simulator)}\n'
        f'api_key_file = "{key_file.name}"\n'
    )
    # The config holds no secret (the database URL has no password): 644 is fine for it.
    followed_advice = write_config(tmp_path, db_url, [block], mode=0o644)
    result = await run_cli("--config", str(followed_advice), "sync")
    assert result.code == 0, result.output
    assert READABLE_WARNING not in result.stderr
    # The secret file itself readable by others: that deserves the warning.
    key_file.chmod(0o644)
    tight_config = write_config(tmp_path, db_url, [block], mode=0o600, name="tight.toml")
    result = await run_cli("--config", str(tight_config), "sync")
    assert str(key_file) in result.stderr and "readable by other users" in result.stderr


EVIL_NAMES = (
    "x'; drop table syncd.links; --",
    'y"); DELETE FROM syncd.runs; --',
    "z' OR '1'='1",
)


async def test_hostile_tenant_names_are_only_ever_parameters(
    db_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    dataset = sim.make_dataset(tenants=len(EVIL_NAMES) + 1, pairs_per_tenant=120, seed=7)
    for tenant, name in zip(dataset, EVIL_NAMES, strict=False):
        tenant.name = name
    state = sim.SimulatorState(dataset, seed=7)
    async with sim.run_simulator(state) as url:
        path = write_config(tmp_path, db_url, [tenant_block(tenant, url) for tenant in dataset])
        everything = await run_cli("--config", str(path), "sync")
        assert everything.code == 0, everything.output
        for name in EVIL_NAMES:
            # And by name, as an operator would type it.
            one = await run_cli("--config", str(path), "sync", "--tenant", name)
            assert one.code == 0, one.output
    for tenant in dataset:
        assert await current_pairs(engine, tenant.name) == expected_pairs(tenant)
    names = await fetch_all(engine, "SELECT name FROM syncd.tenants ORDER BY name")
    assert sorted(row[0] for row in names) == sorted(tenant.name for tenant in dataset)
    runs = await fetch_all(engine, "SELECT count(*) FROM syncd.runs WHERE status = 'succeeded'")
    assert runs == [(len(dataset) + len(EVIL_NAMES),)]
    async with engine.connect() as connection:
        tables = await connection.scalar(
            sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'syncd'")
        )
    assert tables >= 3
    await assert_history_sound(engine)


async def test_the_simulator_listens_on_loopback_by_default(
    sim_state: sim.SimulatorState,
) -> None:
    async with sim.run_simulator(sim_state) as url:
        port = int(url.rsplit(":", 1)[1])
        assert url == f"http://127.0.0.1:{port}"
        listening = [
            conn.laddr
            for conn in psutil.Process().net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
        ]
        assert [address.ip for address in listening] == ["127.0.0.1"]

    # `syncd simulate` without --host, too.
    process = await start_cli(
        "simulate", "--port", "0", "--tenants", "1", "--pairs", "10", env={"PYTHONUNBUFFERED": "1"}
    )
    try:
        assert process.stdout is not None
        first = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert " at http://127.0.0.1:" in first, first

        def sockets() -> list[tuple[str, int]]:
            return [
                (conn.laddr.ip, conn.laddr.port)
                for conn in psutil.Process(process.pid).net_connections(kind="inet")
                if conn.status == psutil.CONN_LISTEN
            ]

        async def bound() -> list[tuple[str, int]]:
            return sockets()

        found = await wait_for(bound, what="syncd simulate to listen")
        assert {ip for ip, _ in found} == {"127.0.0.1"}, found
    finally:
        process.terminate()
        await process.communicate()
    assert config.DaemonConfig().listen.startswith("127.0.0.1:")
