"""`syncd check`, `syncd status` and `syncd grant-reader` against real servers.

`check` meets the simulator over real sockets (plain HTTP, and HTTPS with a trustme CA),
with faults, wrong keys, a closed port and an unresolvable host. `status` and
`grant-reader` run against a real PostgreSQL; the reader role really logs in.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import structlog
import trustme
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import config, db, errors, logs, ops, schema
from syncd import simulator as sim
from syncd.sync import sync_tenant
from tests.fixtures.fault_helpers import run_cli, write_config
from tests.fixtures.helpers import fetch_all, tenant_for

_roles = itertools.count()


@pytest.fixture(autouse=True)
def logs_to_stderr() -> Iterator[None]:
    """structlog's unconfigured default prints to stdout, where these tests read a command's
    output; the CLI sends logs to stderr (logs.configure), so do the same here."""
    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    yield
    structlog.configure(**saved)


# --- helpers -------------------------------------------------------------------------------


def toml_string(value: str) -> str:
    """`value` as a TOML basic string."""
    return json.dumps(value)


def check_args(*tenants: str) -> argparse.Namespace:
    return argparse.Namespace(tenant=list(tenants), data_dir=None)


def table_rows(output: str) -> dict[str, list[str]]:
    """Body rows of the rich tables in `output`, by their first cell."""
    rows = {}
    for line in output.splitlines():
        if line.startswith("│"):
            cells = [cell.strip() for cell in line.strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


def problems(output: str) -> dict[str, str]:
    """`tenant: problem` lines after the check table, each with its hint line joined."""
    found: dict[str, str] = {}
    last = None
    for line in output.splitlines():
        if line.startswith("  hint: ") and last is not None:
            found[last] += "\n" + line.strip()
        elif ": " in line and not line.startswith(("│", " ")):
            name, _, text = line.partition(": ")
            found[name] = text
            last = name
    return found


def clean_environ() -> dict[str, str]:
    """This process's environment without anything that would redirect a syncd command."""
    return {
        key: value
        for key, value in os.environ.items()
        if key not in (config.CONFIG_ENV, config.DATABASE_URL_ENV)
    }


async def run_syncd(*argv: str) -> tuple[int, str, str]:
    """`syncd --log-format json ARGV` in a subprocess: (exit code, stdout, stderr)."""
    result = await run_cli("--log-format", "json", *argv)
    return result.code, result.stdout, result.stderr


# --- check ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_simulator(sim_state: sim.SimulatorState, tls_ca: trustme.CA) -> AsyncIterator[str]:
    """`sim_state` served over HTTPS with a certificate from `tls_ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(context)
    async with sim.run_simulator(sim_state, ssl_context=context) as url:
        assert url.startswith("https://")
        yield url


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port that refuses connections: bound, never listening (so nobody takes it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


async def test_check_reports_each_failure_specifically(
    sim_state: sim.SimulatorState,
    simulator: str,
    tls_simulator: str,
    tls_ca: trustme.CA,
    closed_port: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    t1, t2, t3 = (sim_state.tenants[f"tenant-{n}"] for n in (1, 2, 3))
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    sim_state.inject(sim.Fault("403", tenant="tenant-3", times=None))
    path = write_config(
        tmp_path / "syncd.toml",
        None,
        [
            {"name": "ok", "url": simulator, "api_key_env": "T1_KEY"},
            {"name": "password", "url": simulator, "username": t2.username,
             "password_env": "T2_PASSWORD"},
            {"name": "tls-ok", "url": tls_simulator, "api_key": t1.api_key,
             "ca_file": str(ca_file)},
            {"name": "bad-key", "url": simulator, "api_key": "not-a-key"},
            {"name": "bad-password", "url": simulator, "username": t2.username,
             "password": "wrong"},
            {"name": "forbidden", "url": simulator, "api_key": t3.api_key},
            {"name": "refused", "url": f"http://127.0.0.1:{closed_port}", "api_key": "x"},
            {"name": "dns", "url": "http://vspc.does-not-exist.invalid:1280", "api_key": "x"},
            {"name": "old-version", "url": simulator, "api_key": t1.api_key,
             "client_version": "1.0"},
            {"name": "tls-untrusted", "url": tls_simulator, "api_key": t1.api_key},
        ],
    )  # fmt: skip
    cfg = config.load_config(path, environ={"T1_KEY": t1.api_key, "T2_PASSWORD": t2.password})

    code = await ops.cmd_check(check_args(), cfg, logs.SecretScrubber())

    output = capsys.readouterr().out
    assert code == errors.EXIT_FAILED, output
    rows = table_rows(output)
    # tenant: auth, server reachable, TLS, first page, total pairs, collections answering
    assert rows["ok"] == ["api_key", "yes", "none (http)", "OK", "300", "5 of 5"]
    assert rows["password"] == ["password", "yes", "none (http)", "OK", "300", "5 of 5"]
    assert rows["tls-ok"] == ["api_key", "yes", "verified (ca_file)", "OK", "300", "5 of 5"]
    assert rows["bad-key"] == ["api_key", "yes", "none (http)", "FAILED", "", ""]
    assert rows["bad-password"] == ["password", "yes", "none (http)", "FAILED", "", ""]
    assert rows["forbidden"] == ["api_key", "yes", "none (http)", "FAILED", "", ""]
    assert rows["refused"] == ["api_key", "no", "-", "FAILED", "", ""]
    assert rows["dns"] == ["api_key", "no", "-", "FAILED", "", ""]
    assert rows["old-version"] == ["api_key", "yes", "none (http)", "FAILED", "", ""]
    assert rows["tls-untrusted"] == ["api_key", "yes", "FAILED", "FAILED", "", ""]

    found = problems(output)
    assert set(found) >= {
        "bad-key", "bad-password", "forbidden", "refused", "dns", "old-version", "tls-untrusted"
    }  # fmt: skip
    assert not {"ok", "password", "tls-ok"} & set(found)
    assert "API key was refused" in found["bad-key"] and "HTTP 401" in found["bad-key"]
    assert "api_key_env" in found["bad-key"]
    assert "credentials refused" in found["bad-password"]
    assert "username and password" in found["bad-password"]
    assert "HTTP 403" in found["forbidden"] and "role" in found["forbidden"]
    assert "connection refused" in found["refused"] and "1280" in found["refused"]
    assert "cannot resolve host name" in found["dns"] and "DNS" in found["dns"]
    assert "'1.0'" in found["old-version"] and "client_version" in found["old-version"]
    assert (
        "UnsupportedApiVersion" in found["old-version"] or "not supported" in found["old-version"]
    )
    assert "not trusted" in found["tls-untrusted"] and "ca_file" in found["tls-untrusted"]
    assert "3 of 10 tenant(s) passed" in output
    # Secrets never reach the output.
    assert t1.api_key not in output and t2.password not in output


async def test_check_passes_only_when_every_selected_tenant_passes(
    sim_state: sim.SimulatorState,
    simulator: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    t1 = sim_state.tenants["tenant-1"]
    path = write_config(
        tmp_path / "syncd.toml",
        None,
        [
            {"name": "good", "url": simulator, "api_key": t1.api_key},
            {"name": "bad", "url": simulator, "api_key": "wrong"},
        ],
    )
    cfg = config.load_config(path, environ={})
    assert await ops.cmd_check(check_args("good"), cfg, logs.SecretScrubber()) == errors.EXIT_OK
    assert "1 of 1 tenant(s) passed" in capsys.readouterr().out
    assert await ops.cmd_check(check_args("bad"), cfg, logs.SecretScrubber()) == errors.EXIT_FAILED
    with pytest.raises(errors.UsageError, match="unknown tenant"):
        await ops.cmd_check(check_args("nobody"), cfg, logs.SecretScrubber())


@pytest.mark.slow
async def test_check_exit_codes_through_the_cli(
    sim_state: sim.SimulatorState, simulator: str, tmp_path: Path
) -> None:
    t1 = sim_state.tenants["tenant-1"]
    good = write_config(
        tmp_path / "good.toml", None, [{"name": "good", "url": simulator, "api_key": t1.api_key}]
    )
    bad = write_config(
        tmp_path / "bad.toml", None, [{"name": "bad", "url": simulator, "api_key": "x"}]
    )
    invalid = tmp_path / "invalid.toml"
    invalid.write_text('[[tenants]]\nname = "x"\nurl = "ftp://nowhere"\n', encoding="utf-8")

    results = await asyncio.gather(
        run_syncd("--config", str(good), "check"),
        run_syncd("--config", str(bad), "check"),
        run_syncd("--config", str(invalid), "check"),
    )

    (ok_code, ok_out, _), (bad_code, bad_out, _), (invalid_code, _, invalid_err) = results
    assert ok_code == 0, ok_out
    assert "1 of 1 tenant(s) passed" in ok_out
    assert bad_code == 1 and "API key was refused" in bad_out
    assert invalid_code == 2
    assert "tenants[0].url: not an http(s) URL" in invalid_err


# --- status --------------------------------------------------------------------------------


def status_args(*, as_json: bool) -> argparse.Namespace:
    return argparse.Namespace(json=as_json, data_dir=None)


async def test_status_table_and_json(
    sim_state: sim.SimulatorState,
    simulator: str,
    db_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("tenant-1", "tenant-2"):
        result = await sync_tenant(tenant_for(sim_state.tenants[name], simulator), engine)
        assert result.status == "succeeded"
    sim_state.inject(sim.Fault("403", tenant="tenant-3", times=None))
    failed = await sync_tenant(tenant_for(sim_state.tenants["tenant-3"], simulator), engine)
    assert failed.status == "failed"
    # tenant-2 has left the config (its data stays); "newcomer" has never been synced.
    tenants = [
        {"name": name, "url": simulator, "api_key": "k"}
        for name in ("tenant-1", "tenant-3", "newcomer")
    ]
    cfg = config.load_config(write_config(tmp_path / "s.toml", db_url, tenants), environ={})

    code = await ops.cmd_status(status_args(as_json=True), cfg, logs.SecretScrubber())

    output = capsys.readouterr().out
    document = json.loads(output)
    assert code == errors.EXIT_FAILED
    assert document["ok"] is False
    by_name = {row["tenant"]: row for row in document["tenants"]}
    assert [row["tenant"] for row in document["tenants"]] == [
        "tenant-1", "tenant-3", "newcomer", "tenant-2"
    ]  # fmt: skip
    one = by_name["tenant-1"]
    assert (one["configured"], one["last_status"], one["pairs"], one["ok"]) == (
        True, "succeeded", 300, True
    )  # fmt: skip
    assert one["last_success_at"] is not None and 0 <= one["age_s"] < 60
    assert one["collections"]["jobs"]["status"] == "succeeded"
    assert one["collections"]["jobs"]["seen"] == len(sim_state.tenants["tenant-1"].jobs)
    three = by_name["tenant-3"]
    assert (three["last_status"], three["last_success_at"], three["ok"]) == ("failed", None, False)
    assert three["age_s"] is None and three["pairs"] == 0
    assert {outcome["status"] for outcome in three["collections"].values()} == {"failed"}
    new = by_name["newcomer"]
    assert (new["configured"], new["last_run_at"], new["pairs"], new["ok"]) == (
        True, None, None, False
    )  # fmt: skip
    two = by_name["tenant-2"]
    assert (two["configured"], two["last_status"], two["pairs"]) == (False, "succeeded", 300)

    code = await ops.cmd_status(status_args(as_json=False), cfg, logs.SecretScrubber())
    rows = table_rows(capsys.readouterr().out)
    assert code == errors.EXIT_FAILED
    assert rows["tenant-1"][1:2] == ["succeeded"] and rows["tenant-1"][-2:] == [
        "300", "all 5 succeeded"
    ]  # fmt: skip
    assert rows["tenant-1"][3].endswith("s")  # age, e.g. "1s"
    assert rows["tenant-3"][1] == "failed" and rows["tenant-3"][2] == ""
    assert rows["tenant-3"][-1] == "all 5 failed"
    assert rows["newcomer"][1] == "never synced"
    assert rows["tenant-2 (not in config)"][1] == "succeeded"

    # Only healthy tenants configured: exit 0 (tenant-2 left the config; it does not count).
    healthy = [{"name": "tenant-1", "url": simulator, "api_key": "k"}]
    cfg = config.load_config(write_config(tmp_path / "h.toml", db_url, healthy), environ={})
    code = await ops.cmd_status(status_args(as_json=True), cfg, logs.SecretScrubber())
    assert code == errors.EXIT_OK
    assert json.loads(capsys.readouterr().out)["ok"] is True


async def test_status_refuses_a_schema_behind(
    empty_db_url: str, db_url: str, tmp_path: Path
) -> None:
    cfg = config.load_config(write_config(tmp_path / "e.toml", empty_db_url, []), environ={})
    with pytest.raises(errors.SchemaBehindError, match="syncd migrate"):
        await ops.cmd_status(status_args(as_json=False), cfg, logs.SecretScrubber())

    async with db.open_engine(db_url) as engine:
        await db.downgrade(engine, "0001")
    cfg = config.load_config(write_config(tmp_path / "o.toml", db_url, []), environ={})
    with pytest.raises(errors.SchemaBehindError, match="revision 0001"):
        await ops.cmd_status(status_args(as_json=True), cfg, logs.SecretScrubber())


@pytest.mark.slow
async def test_status_exit_code_through_the_cli(empty_db_url: str, tmp_path: Path) -> None:
    path = write_config(tmp_path / "e.toml", empty_db_url, [])
    code, _, stderr = await run_syncd("--config", str(path), "status", "--json")
    assert code == 1
    assert "no syncd schema yet: run `syncd migrate` first" in stderr


def test_format_age() -> None:
    assert ops.format_age(None) == ""
    assert ops.format_age(0.4) == "0s"
    assert ops.format_age(59) == "59s"
    assert ops.format_age(61) == "1m 1s"
    assert ops.format_age(3 * 3600 + 5 * 60 + 7) == "3h 5m"
    assert ops.format_age(2 * 86400 + 4 * 3600 + 59) == "2d 4h"
    assert ops.format_age(86400) == "1d"


# --- grant-reader --------------------------------------------------------------------------

READER_PASSWORD = "reader-password-for-tests"


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@pytest.fixture(params=["plain", "hostile"])
async def reader_role(request: pytest.FixtureRequest, db_url: str) -> AsyncIterator[str]:
    """A real LOGIN role, dropped (with its grants) afterwards. Roles are server-wide, so the
    name is unique to this process; "hostile" needs quoting to survive as an identifier."""
    base = f"syncd_reader_{os.getpid()}_{next(_roles)}"
    name = base if request.param == "plain" else f'{base} "x"; DROP SCHEMA syncd; --:y'
    admin = await asyncpg.connect(db_url)
    try:
        await admin.execute(
            f"CREATE ROLE {quote_identifier(name)} LOGIN PASSWORD '{READER_PASSWORD}'"
        )
        yield name
    finally:
        await admin.execute(f"DROP OWNED BY {quote_identifier(name)}")
        await admin.execute(f"DROP ROLE {quote_identifier(name)}")
        await admin.close()


async def connect_as(db_url: str, role: str) -> asyncpg.Connection:
    return await asyncpg.connect(db_url, user=role, password=READER_PASSWORD)


async def test_grant_reader_allows_the_views_and_nothing_else(
    reader_role: str,
    sim_state: sim.SimulatorState,
    simulator: str,
    db_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = await sync_tenant(tenant_for(sim_state.tenants["tenant-1"], simulator), engine)
    assert result.status == "succeeded"
    reader = await connect_as(db_url, reader_role)
    try:
        # Before the grant the role sees nothing, so what follows proves the grant works.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.fetchval("SELECT count(*) FROM syncd.job_links_current")

        cfg = config.load_config(write_config(tmp_path / "g.toml", db_url, []), environ={})
        args = argparse.Namespace(role=reader_role, data_dir=None)
        code = await ops.cmd_grant_reader(args, cfg, logs.SecretScrubber())
        assert code == errors.EXIT_OK
        assert "GRANT SELECT ON" in capsys.readouterr().out

        assert await reader.fetchval("SELECT count(*) FROM syncd.job_links_current") == 300
        for view in schema.REPORTING_VIEWS:
            await reader.fetch(f"SELECT * FROM syncd.{view} LIMIT 5")
        for table in ("links", "tenants", "runs", "schedule"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await reader.fetch(f"SELECT * FROM syncd.{table} LIMIT 1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await reader.execute("INSERT INTO syncd.tenants (name) VALUES ('intruder')")
        # The views are not updatable (PostgreSQL says so before it checks privileges), and
        # the role holds no write privilege on them either (checked below).
        with pytest.raises(asyncpg.PostgresError):
            await reader.execute("DELETE FROM syncd.job_links_current")
        with pytest.raises(asyncpg.PostgresError):
            await reader.execute("INSERT INTO syncd.tenant_status (tenant) VALUES ('x')")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await reader.execute("CREATE TABLE syncd.mine (x int)")
        writable = await reader.fetch(
            "SELECT c.relname, p.privilege FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "CROSS JOIN unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p(privilege) "
            "WHERE n.nspname = 'syncd' AND c.relkind IN ('r', 'v') "
            "AND has_table_privilege(current_user, c.oid, p.privilege)"
        )
        assert writable == []
    finally:
        await reader.close()
    # The hostile name went in as one quoted identifier: nothing was dropped.
    assert (await db.schema_state(engine)).at_head
    assert await fetch_all(engine, "SELECT count(*) FROM syncd.links") == [(300,)]


async def test_grant_reader_is_idempotent(
    reader_role: str, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config.load_config(write_config(tmp_path / "g.toml", db_url, []), environ={})
    args = argparse.Namespace(role=reader_role, data_dir=None)
    assert await ops.cmd_grant_reader(args, cfg, logs.SecretScrubber()) == errors.EXIT_OK
    assert await ops.cmd_grant_reader(args, cfg, logs.SecretScrubber()) == errors.EXIT_OK
    reader = await connect_as(db_url, reader_role)
    try:
        assert await reader.fetchval("SELECT count(*) FROM syncd.tenant_status") == 0
    finally:
        await reader.close()


async def test_grant_reader_to_a_missing_role(db_url: str, tmp_path: Path) -> None:
    cfg = config.load_config(write_config(tmp_path / "g.toml", db_url, []), environ={})
    args = argparse.Namespace(role="no_such_role_anywhere", data_dir=None)
    with pytest.raises(ops.RoleNotFound, match="'no_such_role_anywhere' does not exist"):
        await ops.cmd_grant_reader(args, cfg, logs.SecretScrubber())

    path = write_config(tmp_path / "g.toml", db_url, [])
    code, stdout, stderr = await run_syncd("--config", str(path), "grant-reader", "Postgres")
    assert code == 1, stdout
    assert "role 'Postgres' does not exist (there is 'postgres'" in stderr
