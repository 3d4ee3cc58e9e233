"""`syncd sync` and `syncd migrate` as an operator (or a cron wrapper) sees them: exit codes,
the message on stderr, the summary table. Always a real subprocess.

Exit codes: 0 all succeeded (or skipped as busy); 1 a tenant partial/failed, the database
unreachable or its schema behind; 2 usage or configuration error. No traceback unless
`--log-level debug`. The validator's own rules are tested in tests/test_config.py; here, a
few representative mistakes go through the whole CLI.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import cli, db
from syncd import simulator as sim
from tests.fixtures.fault_helpers import (
    REPO_ROOT,
    CliResult,
    assert_history_sound,
    run_cli,
    summary_rows,
    tenant_block,
    toml_string,
    write_config,
)
from tests.fixtures.helpers import current_pairs, expected_pairs

pytestmark = pytest.mark.slow  # each case starts a Python process (~0.6 s)


def _row(result: CliResult, tenant: str) -> str:
    """The summary table's row of `tenant`, as 'tenant | status | ... | error'."""
    rows = summary_rows(result.stdout)
    assert tenant in rows, result.stdout
    return rows[tenant]


def _assert_usage_error(result: CliResult, path: Path, *problems: str) -> None:
    assert result.code == 2, result.output
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"syncd: error: {path}: invalid configuration"), result.stderr
    for problem in problems:
        assert problem in result.stderr, f"{problem!r} not in:\n{result.stderr}"
    assert "Traceback" not in result.output
    assert result.stdout == ""


async def test_every_config_problem_is_reported_at_once_with_its_toml_path(
    tmp_path: Path,
) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(
        """
[database]
url = "mysql://reports@db/vspc"
statement_timeout = "soon"

[sync]
page_size = 1000
page_sise = 10
interval = "15 minutes"

[daemon]
listen = "localhost"

[[tenants]]
name = "acme"
url = "ftp://vspc.acme.example"
api_key = "k-acme"

[[tenants]]
name = "acme"
url = "https://vspc.example"

[[tenants]]
name = "globex"
url = "https://vspc.globex.example"
api_key = "k-globex"
max_delete_fraction = 2
""",
        encoding="utf-8",
    )
    path.chmod(0o600)
    result = await run_cli("--config", str(path), "sync")
    _assert_usage_error(
        result,
        path,
        "(10 problem(s))",
        "database.url: unsupported scheme 'mysql': use postgresql://",
        "database.statement_timeout: not a duration like '15m' or '90s': 'soon'",
        "sync.page_size: Input should be less than or equal to 500",
        "sync.page_sise: unknown key",
        "sync.interval: not a duration like '15m' or '90s': '15 minutes'",
        "daemon.listen: not a host:port",
        "tenants[0].url: not an http(s) URL",
        "tenants[1].name: duplicate tenant name 'acme' (also tenants[0])",
        "tenants[1]: give api_key or username+password",
        "tenants[2].max_delete_fraction: Input should be less than or equal to 1",
    )
    # The same file through `syncd migrate`: same verdict, nothing touched.
    assert (await run_cli("--config", str(path), "migrate")).code == 2


async def test_secrets_and_ca_files_that_cannot_be_read(tmp_path: Path) -> None:
    unreadable_ca = tmp_path / "ca.pem"
    if os.geteuid() == 0:
        unreadable_ca.mkdir()  # root reads any file: a directory cannot be read as one
    else:
        unreadable_ca.write_text("-----BEGIN CERTIFICATE-----\n")
        unreadable_ca.chmod(0)
    path = tmp_path / "syncd.toml"
    path.write_text(
        f"""
[[tenants]]
name = "from-file"
url = "https://vspc.example"
api_key_file = "secrets/missing.key"

[[tenants]]
name = "from-env"
url = "https://vspc.example"
username = "reporter"
password_env = "SYNCD_TEST_PASSWORD_THAT_IS_NOT_SET"

[[tenants]]
name = "private-ca"
url = "https://vspc.example"
api_key = "k"
ca_file = {toml_string(str(unreadable_ca))}

[[tenants]]
name = "no-ca"
url = "https://vspc.example"
api_key = "k"
ca_file = "nowhere/ca.pem"
""",
        encoding="utf-8",
    )
    path.chmod(0o600)
    result = await run_cli("--config", str(path), "sync")
    _assert_usage_error(
        result,
        path,
        "(4 problem(s))",
        f"tenants[0].api_key_file: cannot read secret file {tmp_path}/secrets/missing.key: "
        "No such file or directory",
        "tenants[1].password_env: environment variable SYNCD_TEST_PASSWORD_THAT_IS_NOT_SET "
        "is not set or empty",
        f"tenants[2].ca_file: cannot read CA file {unreadable_ca}: ",
        f"tenants[3].ca_file: cannot read CA file {tmp_path}/nowhere/ca.pem: "
        "No such file or directory",
    )


async def test_files_that_are_not_a_config(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    result = await run_cli("--config", str(missing), "sync")
    _assert_usage_error(result, missing, "file not found")

    broken = tmp_path / "broken.toml"
    broken.write_text('[sync]\npage_size = 100\n[[tenants]\nname = "x"\n', encoding="utf-8")
    result = await run_cli("--config", str(broken), "sync")
    _assert_usage_error(result, broken, "not valid TOML", "line 3")

    # No --config: $SYNCD_CONFIG, then ./syncd.toml; the message names the file it tried.
    result = await run_cli("sync", cwd=tmp_path)
    _assert_usage_error(result, Path("syncd.toml"), "file not found")


async def test_usage_errors(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path, db_url, [tenant_block(sim_state.tenants["tenant-1"], simulator)])
    unknown = await run_cli("--config", str(path), "sync", "--tenant", "tenant-9")
    assert unknown.code == 2, unknown.output
    assert unknown.stderr.strip() == (
        "syncd: error: unknown tenant(s): tenant-9 (configured: tenant-1)"
    )
    unguarded = await run_cli("--config", str(path), "sync", "--allow-mass-delete")
    assert unguarded.code == 2, unguarded.output
    assert "--allow-mass-delete needs --tenant NAME" in unguarded.stderr

    empty = write_config(tmp_path, db_url, [], name="empty.toml")
    nothing = await run_cli("--config", str(empty), "sync")
    assert nothing.code == 2, nothing.output
    assert "no tenants configured" in nothing.stderr
    for result in (unknown, unguarded, nothing):
        assert "Traceback" not in result.output


async def test_schema_behind_then_migrate(
    sim_state: sim.SimulatorState, simulator: str, empty_db_url: str, tmp_path: Path
) -> None:
    path = write_config(
        tmp_path, empty_db_url, [tenant_block(sim_state.tenants["tenant-1"], simulator)]
    )
    async with db.open_engine(empty_db_url) as engine:
        head = (await db.schema_state(engine)).head

        fresh = await run_cli("--config", str(path), "sync")
        assert fresh.code == 1, fresh.output
        assert (
            "syncd: error: the database has no syncd schema yet: run `syncd migrate` first"
            in fresh.stderr.splitlines()
        ), fresh.stderr

        migrated = await run_cli("--config", str(path), "migrate")
        assert migrated.code == 0, migrated.output
        assert migrated.stdout.strip() == f"schema upgraded from nothing to {head}"
        again = await run_cli("--config", str(path), "migrate")
        assert (again.code, again.stdout.strip()) == (0, f"schema already at {head}")

        await db.downgrade(engine, "0001")
        behind = await run_cli("--config", str(path), "sync")
        assert behind.code == 1, behind.output
        assert f"the database schema is at revision 0001, this syncd needs {head}" in (
            behind.stderr
        )
        assert "run `syncd migrate`" in behind.stderr
        assert "Traceback" not in behind.output
        assert (await run_cli("--config", str(path), "migrate")).code == 0

        synced = await run_cli("--config", str(path), "sync")
        assert synced.code == 0, synced.output
        assert await current_pairs(engine, "tenant-1") == expected_pairs(
            sim_state.tenants["tenant-1"]
        )


async def _sync(path: Path, *args: str) -> CliResult:
    return await run_cli("--config", str(path), "sync", *args)


async def test_failed_and_partial_tenants_exit_1_and_the_others_still_sync(
    sim_state: sim.SimulatorState,
    simulator: str,
    db_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
) -> None:
    path = write_config(
        tmp_path, db_url, [tenant_block(t, simulator) for t in sim_state.tenants.values()]
    )
    first = await _sync(path)
    assert first.code == 0, first.output
    sim_state.inject(sim.Fault(kind="403", tenant="tenant-2", times=None))
    sim_state.inject(sim.Fault(kind="520", tenant="tenant-3", offset=98, times=None))
    for name in sim_state.tenants:
        sim_state.churn(name, 0.02)

    result = await _sync(path)
    assert result.code == 1, result.output
    assert "succeeded" in _row(result, "tenant-1")
    failed = _row(result, "tenant-2")
    assert "| failed |" in failed
    assert "tenant 'tenant-2', offset 0: HTTP 403" in failed
    assert "lacks a role that may read backup copy job objects" in failed
    partial = _row(result, "tenant-3")
    assert "| partial |" in partial
    assert "removals withheld" in partial and "offset 98" in partial
    assert "Traceback" not in result.output
    assert await current_pairs(engine, "tenant-1") == expected_pairs(sim_state.tenants["tenant-1"])

    only_good = await _sync(path, "--tenant", "tenant-1")
    assert only_good.code == 0, only_good.output
    assert set(summary_rows(only_good.stdout)) == {"tenant-1"}

    sim_state.clear_faults()
    healed = await _sync(path)
    assert healed.code == 0, healed.output
    for name, tenant in sim_state.tenants.items():
        assert "succeeded" in _row(healed, name)
        assert await current_pairs(engine, name) == expected_pairs(tenant)
    await assert_history_sound(engine)


async def test_mass_delete_guard_exit_code_and_override(
    sim_state: sim.SimulatorState,
    simulator: str,
    db_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, db_url, [tenant_block(sim_state.tenants["tenant-1"], simulator)])
    assert (await _sync(path)).code == 0
    tenant = sim_state.tenants["tenant-1"]
    del tenant.items[40:]
    sim_state.invalidate("tenant-1")
    guarded = await _sync(path)
    assert guarded.code == 1, guarded.output
    row = _row(guarded, "tenant-1")
    assert "| partial |" in row and "mass-delete guard" in row
    assert "syncd sync --tenant tenant-1 --allow-mass-delete" in row
    allowed = await _sync(path, "--tenant", "tenant-1", "--allow-mass-delete")
    assert allowed.code == 0, allowed.output
    assert await current_pairs(engine, "tenant-1") == expected_pairs(tenant)


def test_the_event_loop_is_uvloop_when_installed_else_asyncio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with monkeypatch.context() as hidden:
        hidden.setitem(sys.modules, "uvloop", None)  # what an install without it looks like
        assert cli.event_loop_factory() is None
        with asyncio.Runner(loop_factory=cli.event_loop_factory()) as runner:
            assert type(runner.get_loop()).__module__.startswith("asyncio")
    uvloop = pytest.importorskip("uvloop")  # the speed extra
    assert cli.event_loop_factory() is uvloop.new_event_loop


async def test_sync_runs_without_uvloop(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, tmp_path: Path
) -> None:
    # uvloop is an optional extra (and a dev dependency): hide it, as a plain install has it.
    hidden = tmp_path / "no-uvloop" / "uvloop"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('uvloop is not installed')\n")
    path = write_config(
        tmp_path, db_url, [tenant_block(t, simulator) for t in sim_state.tenants.values()]
    )
    result = await run_cli(
        "--config",
        str(path),
        "sync",
        env={"PYTHONPATH": os.pathsep.join([str(hidden.parent), str(REPO_ROOT)])},
    )
    assert result.code == 0, result.output
    assert all("succeeded" in _row(result, name) for name in sim_state.tenants)
