"""Shared checks of the fault, process, CLI and security tests.

`assert_history_sound` is the database half of every fault scenario: whatever went wrong,
the stored history must still be one that a correct syncd could have written.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import simulator as sim
from tests.helpers import Identity, fetch_all

REPO_ROOT = Path(__file__).resolve().parent.parent


async def assert_history_sound(engine: AsyncEngine, *, allow_running: bool = False) -> None:
    """No duplicate or overlapping interval, bookkeeping that matches, no write by a failure.

    - every pair has at most one open interval, and its intervals do not overlap;
    - `tenants.current_pairs` equals the open intervals of the tenant;
    - intervals were opened only by runs that stored data (succeeded/partial) and closed
      only by complete snapshots (succeeded): a failed run wrote nothing;
    - no run is left `running` (unless `allow_running`, for a process killed on purpose).
    """
    bad_intervals = await fetch_all(
        engine,
        """
        SELECT tenant_id, job_uid::text, linked_job_uid::text, valid_from, valid_to
          FROM (SELECT l.*,
                       lag(valid_to) OVER w AS previous_to,
                       row_number() OVER w AS position
                  FROM syncd.links l
                WINDOW w AS (PARTITION BY tenant_id, job_uid, unique_job_uid, linked_job_uid
                             ORDER BY valid_from, id)) x
         WHERE (position > 1 AND (previous_to IS NULL OR previous_to > valid_from))
            OR (valid_to IS NOT NULL AND valid_to <= valid_from)
        """,
    )
    assert bad_intervals == [], f"duplicate or overlapping intervals: {bad_intervals[:5]}"
    bookkeeping = await fetch_all(
        engine,
        """
        SELECT t.name, t.current_pairs,
               (SELECT count(*) FROM syncd.links l
                 WHERE l.tenant_id = t.id AND l.valid_to IS NULL)
          FROM syncd.tenants t
        """,
    )
    assert all(row[1] == row[2] for row in bookkeeping), f"current_pairs drifted: {bookkeeping}"
    wrong_writers = await fetch_all(
        engine,
        """
        SELECT 'opened', r.id, r.status FROM syncd.links l JOIN syncd.runs r
            ON r.id = l.opened_run_id WHERE r.status NOT IN ('succeeded', 'partial')
        UNION ALL
        SELECT 'closed', r.id, r.status FROM syncd.links l JOIN syncd.runs r
            ON r.id = l.closed_run_id WHERE r.status <> 'succeeded'
        UNION ALL
        SELECT 'orphan', l.opened_run_id, NULL FROM syncd.links l
         WHERE NOT EXISTS (SELECT 1 FROM syncd.runs r WHERE r.id = l.opened_run_id)
        """,
    )
    assert wrong_writers == [], f"links written by runs that must not write: {wrong_writers[:5]}"
    if not allow_running:
        running = await fetch_all(
            engine, "SELECT id, tenant FROM syncd.sync_runs WHERE status = 'running'"
        )
        assert running == [], f"runs left running: {running}"


def sort_key(item: Mapping[str, str]) -> tuple[str, str, str]:
    """The order the client asks VSPC for (jobUid, linkedJobUid, uniqueJobUid; absent first)."""
    return (item["jobUid"], item["linkedJobUid"], item.get("uniqueJobUid", ""))


def identity(item: Mapping[str, str]) -> Identity:
    return (item["jobUid"], item.get("uniqueJobUid"), item["linkedJobUid"])


def pairs_outside(items: Iterable[Mapping[str, str]], start: int, stop: int) -> set[Identity]:
    """Pairs at sorted positions outside [start, stop): what pages other than that one hold."""
    ordered = sorted(items, key=sort_key)
    return {identity(item) for index, item in enumerate(ordered) if not start <= index < stop}


async def run_row(engine: AsyncEngine, run_id: int | None) -> tuple[Any, ...]:
    """(status, error, finished) of one run, as the reporting view shows it."""
    rows = await fetch_all(
        engine,
        "SELECT status, error, finished_at IS NOT NULL FROM syncd.sync_runs WHERE id = :id",
        id=run_id,
    )
    assert len(rows) == 1, rows
    return rows[0]


async def wait_for(
    predicate: Callable[[], Awaitable[Any]], *, timeout_s: float = 10.0, what: str = "condition"
) -> Any:
    """Polls `predicate` until it returns something truthy; fails after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


async def scalar(engine: AsyncEngine, statement: str, **params: Any) -> Any:
    async with engine.connect() as connection:
        return await connection.scalar(sa.text(statement), params)


# --- the CLI as a user runs it ------------------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def summary_rows(stdout: str) -> dict[str, str]:
    """The summary table's rows by tenant, each as one line (rich may wrap long cells)."""
    rows: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    for line in stdout.splitlines():
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if cells[0]:
            current = rows.setdefault(cells[0], [[] for _ in cells])
        assert current is not None, stdout
        for column, cell in enumerate(cells):
            if cell:
                current[column].append(cell)
    return {
        tenant: " | ".join(" ".join(parts) for parts in cells) for tenant, cells in rows.items()
    }


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a `syncd` subprocess: no inherited syncd settings, wide output."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SYNCD_") and key not in ("COLUMNS", "TERM")
    }
    env["COLUMNS"] = "400"  # fewer folded cells (where rich honours it); see summary_rows
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra or {})
    return env


async def start_cli(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> asyncio.subprocess.Process:
    """Starts `python -m syncd.cli ARGS` without waiting (the test's event loop keeps serving
    the simulator meanwhile)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncd.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=cli_env(env),
        cwd=str(cwd or REPO_ROOT),
    )


async def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 60.0,
) -> CliResult:
    """Runs `python -m syncd.cli ARGS` to the end."""
    process = await start_cli(*args, env=env, cwd=cwd)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())


def toml_string(value: str) -> str:
    """`value` as a TOML basic string."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def tenant_block(
    sim_tenant: sim.SimTenant,
    url: str,
    *,
    password: bool = False,
    name: str | None = None,
    **settings: Any,
) -> str:
    """A `[[tenants]]` table that reaches `sim_tenant` (settings as TOML-ready values)."""
    lines = [
        "[[tenants]]",
        f"name = {toml_string(name or sim_tenant.name)}",
        f"url = {toml_string(url)}",
    ]
    if password:
        lines.append(f"username = {toml_string(sim_tenant.username)}")
        lines.append(f"password = {toml_string(sim_tenant.password)}")
    else:
        lines.append(f"api_key = {toml_string(sim_tenant.api_key)}")
    for key, value in settings.items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return toml_string(str(value))


FAST_SYNC_TOML = """
[sync]
backoff_base = "5ms"
backoff_max = "20ms"
max_retries = 2
request_timeout = "5s"
page_size = 50
max_concurrent_pages = 4
"""


def write_config(
    directory: Path,
    database_url: str | None,
    blocks: Sequence[str],
    *,
    extra: str = FAST_SYNC_TOML,
    database: str = "",
    mode: int = 0o600,
    name: str = "syncd.toml",
) -> Path:
    """Writes a config file (mode 600 unless told) and returns its path; `database` holds
    more lines of the `[database]` table."""
    parts = []
    if database_url is not None:
        parts.append(f"[database]\nurl = {toml_string(database_url)}\n{database}")
    parts.append(extra)
    parts.extend(blocks)
    path = directory / name
    path.write_text("\n".join(parts), encoding="utf-8")
    path.chmod(mode)
    return path
