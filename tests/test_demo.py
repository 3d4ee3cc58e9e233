"""`syncd demo` end to end, as a user runs it: a subprocess with its own embedded PostgreSQL.

After the demo exits (and stops its server), the test starts the same data directory again
and checks the demo's printed numbers against the database, and the database against the
simulator's data (rebuilt here from the same seed). A second run must print the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import config, db, demo, embedded
from tests.fixtures.helpers import current_pairs, expected_pairs, fetch_all

PAIRS = 1000  # the demo's default
IMMEDIATE = round(PAIRS * demo.IMMEDIATE_FRACTION)  # immediate pairs per tenant
TENANTS = [f"tenant-{number}" for number in range(1, demo.DEMO_TENANTS + 1)]

_RESULT = re.compile(
    r"^  (?P<tenant>tenant-\d+): (?P<pairs>\d+) pairs now; "
    r"second sync added (?P<added>\d+), removed (?P<removed>\d+)$",
    re.MULTILINE,
)
_CHURN = re.compile(
    r"^  (?P<tenant>tenant-\d+): removed (?P<removed>\d+) pairs, added (?P<added>\d+)$",
    re.MULTILINE,
)
_PSQL = re.compile(r"^  (?P<command>\S*psql \"postgresql://\S+\")$", re.MULTILINE)


@dataclass(frozen=True)
class DemoRun:
    code: int
    stdout: str
    stderr: str

    def results(self) -> dict[str, tuple[int, int, int]]:
        """(pairs now, added, removed) by tenant, from the "Result" section."""
        return {
            m["tenant"]: (int(m["pairs"]), int(m["added"]), int(m["removed"]))
            for m in _RESULT.finditer(self.stdout)
        }

    def churn(self) -> dict[str, tuple[int, int]]:
        """(removed, added) by tenant, as the demo said the simulator churned."""
        return {
            m["tenant"]: (int(m["removed"]), int(m["added"])) for m in _CHURN.finditer(self.stdout)
        }

    def table(self, *header: str) -> dict[str, list[str]]:
        """Rows of the one table printed with this header, by their first cell."""
        tables: list[tuple[list[str], dict[str, list[str]]]] = []
        for line in self.stdout.splitlines():
            cells = [cell.strip() for cell in line[1:-1].split(line[0])] if line else []
            if line.startswith("┃"):
                tables.append((cells, {}))
            elif line.startswith("│") and tables:
                tables[-1][1][cells[0]] = cells[1:]
        matching = [rows for cells, rows in tables if tuple(cells) == header]
        assert len(matching) == 1, f"{len(matching)} tables with header {header}"
        return matching[0]


async def run_demo(data_dir: Path) -> DemoRun:
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in (config.CONFIG_ENV, config.DATABASE_URL_ENV)
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncd.cli",
        "--data-dir",
        str(data_dir),
        "demo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return DemoRun(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: pytest makes its base directory private (0700) again at
    # every session start, which locks out the embedded server's own user when tests run as
    # root. A short path also suits PostgreSQL's length-limited Unix socket path.
    with tempfile.TemporaryDirectory(prefix="syncd-demo-test-") as parent:
        yield Path(parent) / "pg"


@pytest.fixture(scope="module")
async def first_run(data_dir: Path) -> DemoRun:
    return await run_demo(data_dir)


@contextlib.asynccontextmanager
async def demo_database(data_dir: Path) -> AsyncIterator[tuple[AsyncEngine, str]]:
    """The demo's database, on its data directory started again; (engine, server URL)."""
    async with embedded.running(data_dir) as server_url:
        url = embedded.socket_url(demo.socket_dir_of(server_url), demo.DEMO_DATABASE)
        async with db.open_engine(url, pool_size=2) as engine:
            yield engine, url


def expected_state() -> dict[str, set[tuple[str, str | None, str]]]:
    """The simulator's pairs of both copy modes at the end of the demo, rebuilt from the
    demo's seed (the two modes' copy jobs differ, so their pairs never coincide)."""
    state = demo.demo_state(PAIRS)
    demo.apply_churn(state)
    return {
        name: expected_pairs(state.tenants[name])
        | {
            (item["jobUid"], item.get("uniqueJobUid"), item["linkedJobUid"])
            for item in state.tenants[name].immediate_items
        }
        for name in TENANTS
    }


@pytest.mark.slow
async def test_demo_prints_what_the_database_holds(first_run: DemoRun, data_dir: Path) -> None:
    run = first_run
    assert run.code == 0, run.stdout + run.stderr
    assert "embedded PostgreSQL at" in run.stderr
    assert "set database.url for production" in run.stderr
    compared = 3 * (PAIRS + IMMEDIATE)
    assert f"verified: the copy matches the simulator exactly ({compared} pairs compared)" in (
        run.stdout
    )
    # The demo shows links by name and the jobs nothing copies.
    named = run.table(
        "tenant",
        "copy_mode",
        "copy_job_name",
        "source_job_name",
        "source_job_type",
        "organization_name",
    )
    assert named and all(row[1] for row in named.values())
    assert run.table("tenant", "name", "type", "backup_server_name", "organization_name")
    results, churn = run.results(), run.churn()
    assert sorted(results) == sorted(churn) == TENANTS
    wanted = expected_state()
    changed = run.table("tenant", "copy_jobs_changed", "pairs_added", "pairs_removed")
    now = run.table("tenant", "pairs", "copy_jobs", "source_jobs")
    assert sorted(changed) == sorted(now) == TENANTS

    async with demo_database(data_dir) as (engine, url):
        assert (await db.schema_state(engine)).at_head
        for name in TENANTS:
            pairs, added, removed = results[name]
            assert churn[name] == (removed, added)
            assert added > 0 and removed > 0  # the churn really changed something
            stored = await current_pairs(engine, name)
            assert stored == wanted[name]
            assert pairs == len(stored) == int(now[name][0])
            runs = await fetch_all(
                engine,
                "SELECT status, pairs_added, pairs_removed FROM syncd.sync_runs "
                "WHERE tenant = :tenant ORDER BY id",
                tenant=name,
            )
            assert runs == [("succeeded", PAIRS + IMMEDIATE, 0), ("succeeded", added, removed)]
            # The example query on job_link_changes printed the same numbers.
            changes = await fetch_all(
                engine,
                "SELECT change, count(*) FROM syncd.job_link_changes c "
                "WHERE tenant = :tenant AND sync_run_id = "
                "(SELECT max(id) FROM syncd.sync_runs r WHERE r.tenant = :tenant) "
                "GROUP BY change ORDER BY change",
                tenant=name,
            )
            assert changes == [("added", added), ("removed", removed)]
            assert changed[name][1:] == [str(added), str(removed)]

        # The printed psql command reaches this database while the server is up.
        match = _PSQL.search(run.stdout)
        assert match is not None, run.stdout
        command = shlex.split(match["command"])
        assert command[1] == url
        process = await asyncio.create_subprocess_exec(
            *command,
            "-Atc",
            "SELECT count(*) FROM syncd.job_links_current",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 0, stderr.decode()
        assert stdout.decode().strip() == str(sum(len(pairs) for pairs in wanted.values()))


@pytest.mark.slow
async def test_demo_runs_again_with_the_same_result(first_run: DemoRun, data_dir: Path) -> None:
    assert first_run.code == 0, first_run.stderr
    again = await run_demo(data_dir)
    assert again.code == 0, again.stdout + again.stderr
    assert again.results() == first_run.results()
    assert again.churn() == first_run.churn()
    # The example queries print the same rows (the sync tables hold timings, which differ).
    for header in (
        ("tenant", "pairs", "copy_jobs", "source_jobs"),
        ("tenant", "copy_jobs_changed", "pairs_added", "pairs_removed"),
    ):
        assert again.table(*header) == first_run.table(*header)
    async with demo_database(data_dir) as (engine, _):
        # The database was recreated: two runs per tenant, not four.
        counts = await fetch_all(
            engine, "SELECT tenant, count(*) FROM syncd.sync_runs GROUP BY tenant ORDER BY 1"
        )
        assert counts == [(name, 2) for name in TENANTS]
        wanted = expected_state()
        for name in TENANTS:
            assert await current_pairs(engine, name) == wanted[name]


@pytest.mark.slow
async def test_demo_keep_running_serves_until_sigterm(data_dir: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncd.cli",
        "--data-dir",
        str(data_dir),
        "demo",
        "--keep-running",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    printed = ""
    try:
        async with asyncio.timeout(60):
            while "stay up until you press Ctrl-C" not in printed:
                line = await process.stdout.readline()
                assert line, f"the demo ended instead of staying up:\n{printed}"
                printed += line.decode()
        match = _PSQL.search(printed)
        assert match is not None, printed
        reader = await asyncpg.connect(shlex.split(match["command"])[1])
        try:
            count = await reader.fetchval("SELECT count(*) FROM syncd.job_links_current")
            assert count == 3 * (PAIRS + IMMEDIATE)
        finally:
            await reader.close()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(process.stdout.read(), timeout=30)
        await process.wait()
    assert process.returncode == 0
    assert "stopping" in rest.decode()
    assert not (data_dir / "postmaster.pid").exists(), "the embedded server was left running"
