"""End-to-end sync benchmark: `python -m benchmarks.sync [--tenants T] [--pairs-per-tenant N]`.

Starts the simulator (`benchmarks.simserver`) in its own process with every page body cached,
creates a fresh database `syncd_bench_<pid>` on `$SYNCD_BENCH_DATABASE_URL`'s server, and
measures, `--repeat` times each (median reported), every phase in a fresh process:

  limit_fetch       `benchmarks.limit`, written without syncd: plain aiohttp + orjson fetch
                    of every page (4 pages of a tenant, 16 in all, in flight)
  limit_fetch_copy  the same, every pair streamed into ONE binary COPY into an UNLOGGED
                    table without indexes: THE LIMIT every other phase is a ratio to
  parse             syncd's parse+check CPU alone, over raw page bodies     (in-process)
  fetch             syncd's client reads every page of every tenant         (in-process)
  fetch_copy        the same plus COPY, built from syncd's client           (in-process)
  initial           `syncd --config FILE sync` into empty tables            (whole process)
  noop              `syncd sync` again, nothing changed                     (whole process)
  churn             `syncd sync` after 1% of each tenant's pairs were removed and 1% added

Whole-process phases are timed from spawn to exit, as a cron job pays them; their CPU time
and peak RSS are the child's own (`os.wait4`), and the simulator records when the first
request of each arrived (the time to the first VSPC request). In-process phases
(`benchmarks.phases`) time only the work, after start-up: their ratio is to the limit's own
inner time (first request to last row copied). `syncd --version` is timed too.

`--in-process-syncs` adds initial/noop/churn run in-process (`sync.sync_tenants`), for
profiles. `--bloat-rounds R` then runs R more churn re-syncs and reports the size of
`syncd.links` and its indexes before, after, and after a VACUUM. `--scaling` instead runs the
limit and the three syncs at several sizes (default 100x10,000, 1,000x10,000 and
1,000x1,000: minutes and gigabytes, never a CI test) and compares time per link. Prints
tables; `--json PATH` writes the same figures. Exits 1 when a phase did not succeed (the
figures would mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import asyncpg
import orjson
import psutil  # type: ignore[import-untyped]
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from benchmarks.phases import SYNCD_TABLES, PgProbe, PhaseSpec
from syncd import config, db, models, paging, schema

DATABASE_URL_ENV = "SYNCD_BENCH_DATABASE_URL"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CHURN_FRACTION = 0.01
LIMIT_TABLE = "bench_limit"
LIMIT_PAGES_PER_TENANT = 4
LIMIT_PAGES_IN_FLIGHT = 16
VERSION_RUNS = 7

LIMIT = "limit_fetch_copy"
# Phases run as a whole process of their own: spawn to exit.
PROCESS_PHASES = ("limit_fetch", "limit_fetch_copy", "initial", "noop", "churn")
IN_PROCESS_SYNCS = ("initial_in_process", "noop_in_process", "churn_in_process")
PHASES = (
    "limit_fetch",
    "limit_fetch_copy",
    "parse",
    "fetch",
    "fetch_copy",
    "initial",
    "noop",
    "churn",
    *IN_PROCESS_SYNCS,
)
SCALING_PHASES = ("limit_fetch_copy", "initial", "noop", "churn")
PHASE_TITLES = {
    "limit_fetch": "limit: fetch (aiohttp)",
    "limit_fetch_copy": "LIMIT: fetch+copy",
    "parse": "parse+check only",
    "fetch": "syncd fetch-only",
    "fetch_copy": "syncd client fetch+copy",
    "initial": "syncd sync: initial",
    "noop": "syncd sync: no-op",
    "churn": "syncd sync: 1% churn",
    "initial_in_process": "in-process: initial",
    "noop_in_process": "in-process: no-op",
    "churn_in_process": "in-process: 1% churn",
}


@dataclass(frozen=True)
class Target:
    """One performance target of issue #16: `measured <= limit` is met. `stretch` is the
    better figure aimed at beyond it, where the issue gives one."""

    name: str
    limit: float
    unit: str
    stretch: float | None = None


# Whole-process phase -> its largest ratio to the limit (limit_fetch_copy, same run).
RATIO_TARGETS = {
    "noop": Target("no-op re-sync / limit (whole process)", 1.5, "x", 1.1),
    "churn": Target("1% churn re-sync / limit (whole process)", 2.0, "x", 1.5),
    "initial": Target("initial sync / limit (whole process)", 3.0, "x", 2.0),
}
FETCH_TARGET = Target("syncd fetch-only / plain aiohttp fetch", 1.5, "x", 1.2)
VERSION_TARGET = Target("`syncd --version` wall time", 0.25, "s")
FIRST_REQUEST_TARGET = Target("spawn to first VSPC request (worst sync phase)", 0.4, "s")
PEAK_RSS_TARGET = Target("peak RSS of `syncd sync` (worst sync phase)", 120.0, "MB", 100.0)
# Scaling: the sizes (tenants x pairs per tenant), and how much the time per link of the
# second and third may exceed the first's: 10M links vs 1M within 15%, 1,000 small tenants
# vs 100 large ones within 30%. A size that is faster per link meets its target.
DEFAULT_SCALING_SIZES = "100x10000,1000x10000,1000x1000"
SCALING_GROWTH_LIMITS = (1.15, 1.30)
NOOP_WAL_TARGET_BYTES = 1_000_000
PARSE_CPU_TARGET_S_PER_MILLION = 2.0
MB = 1_000_000


def with_database(url: str, database: str) -> str:
    """`url` pointing at `database` on the same server (plain postgresql:// form)."""
    return (
        make_url(url)
        .set(drivername="postgresql", database=database)
        .render_as_string(hide_password=False)
    )


# --- the simulator process --------------------------------------------------------------


class SimulatorProcess:
    """`benchmarks.simserver` running as a child; speaks JSON lines over its pipes."""

    def __init__(
        self, *, tenants: int, pairs: int, seed: int, page_size: int, jobs_per_tenant: int = 0
    ) -> None:
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.simserver",
                f"--tenants={tenants}",
                f"--pairs={pairs}",
                f"--seed={seed}",
                f"--page-size={page_size}",
                f"--jobs-per-tenant={jobs_per_tenant}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self._read()
        self.url: str = ready["url"]
        self.pid: int = ready["pid"]
        self.tenants: list[tuple[str, str]] = [(t["name"], t["api_key"]) for t in ready["tenants"]]
        self.pairs: int = ready["pairs"]
        self.jobs: int = ready["jobs"]
        self.warm_s: float = ready["warm_s"]

    def _read(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the simulator exited (status {self._process.wait()})")
        answer: dict[str, Any] = orjson.loads(line)
        return answer

    def _send(self, command: dict[str, Any]) -> None:
        stdin: IO[str] | None = self._process.stdin
        assert stdin is not None
        stdin.write(orjson.dumps(command).decode() + "\n")
        stdin.flush()

    def churn(self, fraction: float) -> dict[str, Any]:
        """Removes and adds `fraction` of every tenant's pairs; waits until pages are warm."""
        self._send({"cmd": "churn", "fraction": fraction})
        return self._read()

    def mark(self) -> float:
        """Starts a new request log; the simulator's `time.monotonic()` at that moment."""
        self._send({"cmd": "mark"})
        marked_at: float = self._read()["marked_at"]
        return marked_at

    def first_request_at(self) -> float | None:
        """`time.monotonic()` of the first request since the last `mark`, if any came."""
        self._send({"cmd": "first_request"})
        first: float | None = self._read()["first_request_at"]
        return first

    def stop(self) -> None:
        """Asks the simulator to quit; kills it if it does not."""
        with contextlib.suppress(OSError):
            self._send({"cmd": "quit"})
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


# --- the database -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def bench_database(server_url: str) -> AsyncIterator[str]:
    """A fresh database `syncd_bench_<pid>` migrated to head; dropped on exit."""
    name = f"syncd_bench_{os.getpid()}"
    admin = await asyncpg.connect(with_database(server_url, "postgres"))
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name}")
        url = with_database(server_url, name)
        try:
            async with db.open_engine(url, pool_size=1) as engine:
                await db.migrate(engine)
            yield url
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


async def _execute(url: str, *statements: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def server_facts(url: str) -> dict[str, Any]:
    """The PostgreSQL settings that shape the figures."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT name, current_setting(name) AS value FROM pg_settings WHERE name = any($1)",
            [
                "server_version",
                "shared_buffers",
                "work_mem",
                "temp_buffers",
                "autovacuum",
                "synchronous_commit",
                "max_wal_size",
                "jit",
            ],
        )
    finally:
        await connection.close()
    return {row["name"]: row["value"] for row in rows}


async def link_sizes(url: str) -> dict[str, Any]:
    """Sizes (bytes) of syncd.links' heap and each of its indexes, and its tuple counts."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("SELECT pg_stat_clear_snapshot()")
        table = await connection.fetchrow(
            "SELECT pg_relation_size('syncd.links') AS heap, "
            "pg_total_relation_size('syncd.links') AS total, n_live_tup, n_dead_tup "
            "FROM pg_stat_user_tables WHERE schemaname = 'syncd' AND relname = 'links'"
        )
        indexes = await connection.fetch(
            "SELECT indexrelid::regclass::text AS name, pg_relation_size(indexrelid) AS size "
            "FROM pg_index WHERE indrelid = 'syncd.links'::regclass ORDER BY 1"
        )
        rows = await connection.fetchval("SELECT count(*) FROM syncd.links")
        open_rows = await connection.fetchval(
            "SELECT count(*) FROM syncd.links WHERE valid_to IS NULL"
        )
    finally:
        await connection.close()
    return {
        "heap_bytes": table["heap"],
        "total_bytes": table["total"],
        "indexes": {row["name"]: row["size"] for row in indexes},
        "rows": rows,
        "open_rows": open_rows,
        "n_dead_tup": table["n_dead_tup"],
    }


# --- whole processes ----------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessRun:
    """One child process, timed from spawn to exit."""

    seconds: float
    cpu_s: float
    peak_rss_mb: float
    exit_code: int
    spawned_at: float  # time.monotonic() just before the spawn (CLOCK_MONOTONIC, system-wide)
    stdout: str
    stderr: str

    def failure(self, what: str) -> str:
        """A message saying how `what` failed, with the end of its output."""
        tail = "\n".join((self.stdout + self.stderr).strip().splitlines()[-15:])
        return f"{what} exited with {self.exit_code}:\n{tail}"


def run_process(argv: Sequence[str], *, env: dict[str, str] | None = None) -> ProcessRun:
    """Runs `argv` to its end. CPU and peak RSS are that child's own, from `os.wait4`
    (RUSAGE_CHILDREN would give the largest of every child reaped so far)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        spawned_at = time.monotonic()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.monotonic() - spawned_at
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ProcessRun(
            seconds=seconds,
            cpu_s=usage.ru_utime + usage.ru_stime,
            peak_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
            exit_code=process.returncode,
            spawned_at=spawned_at,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


def syncd_command() -> list[str]:
    """How a user runs syncd here: this environment's `syncd` script, else the module."""
    script = Path(sys.executable).with_name("syncd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "syncd.cli"]


def child_environment() -> dict[str, str]:
    """This environment without syncd's own variables ($SYNCD_DATABASE_URL would replace
    the config file's database)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("SYNCD_")}


def toml_text(data: dict[str, Any]) -> str:
    """`data` (tables of strings, numbers and lists, and arrays of such tables) as TOML;
    JSON's escapes and arrays are TOML's."""
    lines: list[str] = []
    for name, table in data.items():
        header = f"[[{name}]]" if isinstance(table, list) else f"[{name}]"
        for row in table if isinstance(table, list) else [table]:
            lines.append(header)
            lines.extend(f"{key} = {orjson.dumps(value).decode()}" for key, value in row.items())
            lines.append("")
    return "\n".join(lines)


def version_seconds(runs: int) -> list[float]:
    """Wall time of `syncd --version`, `runs` times."""
    seconds = []
    for _ in range(runs):
        run = run_process([*syncd_command(), "--version"], env=child_environment())
        if run.exit_code != 0:
            raise RuntimeError(run.failure("syncd --version"))
        seconds.append(run.seconds)
    return seconds


def _cpu_s_of(pid: int) -> float | None:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


class DatabaseBackends:
    """CPU seconds of the server processes serving one database, sampled while a child runs.

    `PgProbe`'s PostgreSQL CPU is the whole server's: on a shared server it includes other
    databases' sessions. A backend's process title names its database ("postgres: ... user
    DATABASE host(port) ..."), so sampling the postmaster's children every `interval_s`
    keeps only this benchmark's. The last interval of a backend that exits is lost (at most
    `interval_s` of CPU each), and the server's own processes (checkpointer, WAL writer)
    are left out: a lower bound, where `pg_cpu_s` is an upper one.
    """

    def __init__(self, postmaster: psutil.Process, database: str, *, interval_s: float = 0.05):
        self.postmaster = postmaster
        self.needle = f" {database} "
        self.interval_s = interval_s
        self.ours: dict[int, psutil.Process | None] = {}
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        pid = postmaster.pid
        self.children_file = Path(f"/proc/{pid}/task/{pid}/children")

    def _children(self) -> list[int]:
        # The kernel's list of the postmaster's children: psutil's children() scans every
        # process of the machine, too much CPU to spend 20 times a second beside a benchmark.
        try:
            return [int(pid) for pid in self.children_file.read_text().split()]
        except OSError:
            return [child.pid for child in self.postmaster.children()]

    def sample(self) -> None:
        for pid in self._children():
            with contextlib.suppress(psutil.Error):
                if pid not in self.ours:
                    process = psutil.Process(pid)
                    title = " ".join(process.cmdline()) + " "
                    if not title.startswith("postgres:"):
                        continue  # just forked, still the postmaster's title: look again
                    self.ours[pid] = process if self.needle in title else None
                process = self.ours[pid]
                if process is not None:
                    times = process.cpu_times()
                    self.last[pid] = float(times.user + times.system)

    async def watch(self, done: asyncio.Event) -> float:
        """Samples until `done`; the CPU seconds used meanwhile."""
        self.sample()
        self.first = dict(self.last)
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.interval_s)
            self.sample()
        return sum(cpu - self.first.get(pid, 0.0) for pid, cpu in self.last.items())


# --- phases -------------------------------------------------------------------------------


def run_phase(spec: PhaseSpec) -> dict[str, Any]:
    """Runs one phase in a fresh `benchmarks.phases` process; its figures."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.phases"],
        input=orjson.dumps(asdict(spec)),
        stdout=subprocess.PIPE,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"phase {spec.phase} failed (exit {result.returncode})")
    figures: dict[str, Any] = orjson.loads(result.stdout.splitlines()[-1])
    if not figures.get("complete", False):
        raise RuntimeError(f"phase {spec.phase} did not complete: {figures}")
    figures["client_cpu_s"] = figures.pop("syncd_cpu_s")
    return figures


class Benchmark:
    """One benchmark run: a simulator, a database, a work folder for the files the child
    processes read, and the figures gathered so far."""

    def __init__(
        self, args: argparse.Namespace, simulator: SimulatorProcess, url: str, workdir: Path
    ) -> None:
        self.args = args
        self.simulator = simulator
        self.url = url
        self.runs: dict[str, list[dict[str, Any]]] = {phase: [] for phase in PHASES}
        self.churned: list[dict[str, Any]] = []
        # Holds API keys: readable by this user only, as syncd asks of a config with secrets.
        self.config_path = workdir / "syncd.toml"
        self.config_path.touch(mode=0o600)
        self.config_path.write_text(toml_text(self.spec("sync").config_data()))
        self.limit_specs: dict[bool, Path] = {}
        for copy in (False, True):
            path = self.limit_specs[copy] = workdir / f"limit-{'copy' if copy else 'fetch'}.json"
            path.write_bytes(
                orjson.dumps(
                    {
                        "simulator_url": simulator.url,
                        "tenants": simulator.tenants,
                        "page_size": args.page_size,
                        "pages_per_tenant": args.limit_pages_per_tenant,
                        "pages_in_flight": args.limit_pages_in_flight,
                        "copy": copy,
                        "database_url": url,
                        "table": LIMIT_TABLE,
                    }
                )
            )

    def spec(self, phase: str) -> PhaseSpec:
        return PhaseSpec(
            phase=phase,
            database_url=self.url,
            simulator_url=self.simulator.url,
            simulator_pid=self.simulator.pid,
            tenants=self.simulator.tenants,
            page_size=self.args.page_size,
            max_concurrent_pages=self.args.max_concurrent_pages,
            max_concurrent_tenants=self.args.max_concurrent_tenants,
            collections=self.args.collections,
        )

    def _file(self, label: str, figures: dict[str, Any]) -> None:
        self.runs[label].append(figures)
        extra = ""
        if figures.get("first_request_s") is not None:
            extra = f" (first request after {figures['first_request_s']:.3f}s)"
        _progress(f"{label}: {figures['seconds']:.2f}s{extra}")

    async def measure(self, label: str, phase: str) -> dict[str, Any]:
        """Checkpoints (so every phase starts with the same WAL full-page-image debt), then
        runs `phase` in a `benchmarks.phases` process and files its figures under `label`."""
        await _execute(self.url, "CHECKPOINT")
        figures = await asyncio.to_thread(run_phase, self.spec(phase))
        figures["baseline_rss_mb"] = figures.get("baseline_rss_mb")
        self._file(label, figures)
        return figures

    async def measure_process(self, label: str, argv: Sequence[str]) -> dict[str, Any]:
        """Checkpoints, then runs `argv` as a whole process and files its figures under
        `label`: wall time, the child's CPU and peak RSS, spawn to first request, and the
        server's CPU, WAL and rows written meanwhile. The figures of what the process did
        come from its output (the limit) or from `syncd.runs` (a sync)."""
        await _execute(self.url, "CHECKPOINT")
        async with PgProbe.open(self.url) as probe:
            last_run_id = await probe.connection.fetchval(
                f"SELECT coalesce(max(id), 0) FROM {schema.SCHEMA}.runs"
            )
            before = await probe.snapshot(settled=False)
            simulator_before = _cpu_s_of(self.simulator.pid)
            await asyncio.to_thread(self.simulator.mark)
            done = asyncio.Event()
            watching = None
            if probe.postmaster is not None:
                backends = DatabaseBackends(probe.postmaster, make_url(self.url).database or "")
                watching = asyncio.create_task(backends.watch(done))
            try:
                run = await asyncio.to_thread(run_process, argv, env=child_environment())
            finally:
                done.set()
            pg_database_cpu_s = None if watching is None else await watching
            simulator_after = _cpu_s_of(self.simulator.pid)
            first_request_at = await asyncio.to_thread(self.simulator.first_request_at)
            if run.exit_code != 0:
                raise RuntimeError(run.failure(label))
            if label.startswith("limit"):
                figures: dict[str, Any] = orjson.loads(run.stdout.splitlines()[-1])
                if figures["syncd_modules"]:
                    raise RuntimeError(f"{label} loaded syncd: {figures['syncd_modules']}")
            else:
                figures = await _sync_figures(probe.connection, last_run_id)
            if not figures["complete"]:
                raise RuntimeError(f"{label} did not complete: {figures}")
            after = await probe.snapshot(settled=True)
            await probe.connection.execute(f"DROP TABLE IF EXISTS {LIMIT_TABLE}")
            wal_bytes = await probe.wal_bytes_between(before["lsn"], after["lsn"])
        figures.update(
            seconds=run.seconds,
            client_cpu_s=run.cpu_s,
            peak_rss_mb=run.peak_rss_mb,
            baseline_rss_mb=None,
            first_request_s=(
                None if first_request_at is None else first_request_at - run.spawned_at
            ),
            pg_database_cpu_s=pg_database_cpu_s,
            pg_cpu_s=(
                None
                if before["pg_cpu_s"] is None or after["pg_cpu_s"] is None
                else after["pg_cpu_s"] - before["pg_cpu_s"]
            ),
            simulator_cpu_s=(
                None
                if simulator_before is None or simulator_after is None
                else simulator_after - simulator_before
            ),
            rows_written={
                table: after["written"][table] - before["written"][table] for table in SYNCD_TABLES
            },
            wal_bytes=wal_bytes,
        )
        self._file(label, figures)
        return figures

    async def measure_limit(self, label: str, *, copy: bool) -> dict[str, Any]:
        """`benchmarks.limit` as a whole process: fetch only, or fetch+copy."""
        argv = [sys.executable, "-m", "benchmarks.limit", str(self.limit_specs[copy])]
        return await self.measure_process(label, argv)

    async def measure_sync(self, label: str) -> dict[str, Any]:
        """`syncd --config FILE sync` as a whole process, as a cron job runs it."""
        argv = [*syncd_command(), "--config", str(self.config_path), "sync"]
        return await self.measure_process(label, argv)

    async def truncate(self) -> None:
        # Every table of syncd's, so a foreign key to one of them never stops the TRUNCATE.
        tables = ", ".join(table.fullname for table in models.metadata.sorted_tables)
        await _execute(self.url, f"TRUNCATE {tables} RESTART IDENTITY")

    async def churn(self) -> None:
        self.churned.append(await asyncio.to_thread(self.simulator.churn, CHURN_FRACTION))

    async def repeat_once(self, phases: Sequence[str]) -> None:
        """Each of `phases` once, in order; syncd's tables are emptied before the syncs."""
        if "limit_fetch" in phases:
            await self.measure_limit("limit_fetch", copy=False)
        if LIMIT in phases:
            await self.measure_limit(LIMIT, copy=True)
        for phase in ("parse", "fetch", "fetch_copy"):
            if phase in phases:
                await self.measure(phase, phase)
        if "initial" in phases:
            await self.truncate()
            await self.measure_sync("initial")
            await self.measure_sync("noop")
            await self.churn()
            await self.measure_sync("churn")
        if "initial_in_process" in phases:
            await self.truncate()
            await self.measure("initial_in_process", "sync")
            await self.measure("noop_in_process", "sync")
            await self.churn()
            await self.measure("churn_in_process", "sync")

    async def bloat(self, rounds: int) -> dict[str, Any]:
        """`rounds` churn re-syncs in a row; sizes before, after, and after VACUUM."""
        before = await link_sizes(self.url)
        seconds = []
        for round_number in range(rounds):
            await asyncio.to_thread(self.simulator.churn, CHURN_FRACTION)
            figures = await asyncio.to_thread(run_phase, self.spec("sync"))
            seconds.append(figures["seconds"])
            _progress(f"bloat round {round_number + 1}/{rounds}: {figures['seconds']:.2f}s")
        after = await link_sizes(self.url)
        await _execute(self.url, "VACUUM (ANALYZE) syncd.links")
        vacuumed = await link_sizes(self.url)
        return {
            "rounds": rounds,
            "before": before,
            "after": after,
            "after_vacuum": vacuumed,
            "first_round_s": seconds[0] if seconds else None,
            "last_round_s": seconds[-1] if seconds else None,
            "median_round_s": statistics.median(seconds) if seconds else None,
        }


async def _sync_figures(connection: asyncpg.Connection, after_run_id: int) -> dict[str, Any]:
    """What the runs after `after_run_id` did, from `syncd.runs`."""
    rows = await connection.fetch(
        f"SELECT status, pairs_seen, pairs_added, pairs_removed FROM {schema.SCHEMA}.runs "
        "WHERE id > $1",
        after_run_id,
    )
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    return {
        "pairs": sum(row["pairs_seen"] for row in rows),
        "added": sum(row["pairs_added"] for row in rows),
        "removed": sum(row["pairs_removed"] for row in rows),
        "statuses": statuses,
        "complete": bool(rows) and statuses.get("succeeded", 0) == len(rows),
    }


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


# --- figures ------------------------------------------------------------------------------

FIGURE_KEYS = (
    "seconds",
    "inner_s",
    "client_cpu_s",
    "pg_cpu_s",
    "pg_database_cpu_s",
    "simulator_cpu_s",
    "baseline_rss_mb",
    "peak_rss_mb",
    "first_request_s",
    "wal_bytes",
    "pairs",
    "pages",
    "copied",
    "added",
    "removed",
    "raw_fetch_s",
    "parse_cpu_s",
    "items_parsed",
)


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Median of each figure over the repeats, plus rates and ratios to the limit.

    A whole-process phase is a ratio to the limit's whole process; an in-process phase
    (timed after start-up) to the limit's inner time, first request to last row copied.
    """
    summary: dict[str, dict[str, Any]] = {}
    for phase, measured in runs.items():
        if not measured:
            continue
        figures: dict[str, Any] = {
            key: _median([run.get(key) for run in measured])
            for key in FIGURE_KEYS
            if any(key in run for run in measured)
        }
        figures["scope"] = "process" if phase in PROCESS_PHASES else "in-process"
        figures["rows_written"] = {
            table: _median([run["rows_written"][table] for run in measured])
            for table in SYNCD_TABLES
        }
        figures["pairs_per_s"] = figures["pairs"] / figures["seconds"]
        figures["runs"] = measured
        summary[phase] = figures
    limit = summary.get(LIMIT, {})
    for figures in summary.values():
        reference = limit.get("seconds" if figures["scope"] == "process" else "inner_s")
        figures["ratio_to_limit"] = _ratio(figures["seconds"], reference)
    if "fetch" in summary:
        # Both timed from the first request to the last page parsed.
        summary["fetch"]["ratio_to_limit_fetch"] = _ratio(
            summary["fetch"]["seconds"], summary.get("limit_fetch", {}).get("inner_s")
        )
    return summary


def _target(
    target: Target | str, value: float | None, limit: float | None = None, unit: str = ""
) -> dict[str, Any]:
    if isinstance(target, str):
        assert limit is not None
        target = Target(target, limit, unit)
    return {
        "target": target.name,
        "value": value,
        "limit": target.limit,
        "stretch": target.stretch,
        "unit": target.unit,
        "met": value is not None and value <= target.limit,
    }


def evaluate_targets(
    summary: dict[str, dict[str, Any]], startup: dict[str, Any]
) -> list[dict[str, Any]]:
    """Each performance target with the measured value and whether it is met."""
    targets: list[dict[str, Any]] = []
    for phase, target in RATIO_TARGETS.items():
        if phase in summary:
            targets.append(_target(target, summary[phase]["ratio_to_limit"]))
    if "fetch" in summary:
        targets.append(_target(FETCH_TARGET, summary["fetch"]["ratio_to_limit_fetch"]))
    if startup.get("version_s") is not None:
        targets.append(_target(VERSION_TARGET, startup["version_s"]))
    sync_phases = [phase for phase in ("initial", "noop", "churn") if phase in summary]
    if sync_phases:
        first = [summary[phase].get("first_request_s") for phase in sync_phases]
        targets.append(
            _target(
                FIRST_REQUEST_TARGET,
                None if None in first else max(f for f in first if f is not None),
            )
        )
        targets.append(
            _target(PEAK_RSS_TARGET, max(summary[phase]["peak_rss_mb"] for phase in sync_phases))
        )
    if "noop" in summary:
        noop = summary["noop"]
        targets.append(_target("no-op link rows written", noop["rows_written"]["links"], 0, "rows"))
        targets.append(_target("no-op WAL", noop["wal_bytes"], NOOP_WAL_TARGET_BYTES, "bytes"))
    if "churn" in summary:
        churn = summary["churn"]
        # An added pair is one row insert, a removed one one row update; nothing else.
        changed = churn["added"] + churn["removed"]
        targets.append(
            _target(
                "churn link rows written - changed pairs",
                churn["rows_written"]["links"] - changed,
                0,
                "rows",
            )
        )
    if "parse" in summary:
        parse = summary["parse"]
        targets.append(
            _target(
                "parse+check CPU per 1M items",
                parse["parse_cpu_s"] * 1_000_000 / max(1, parse["items_parsed"]),
                PARSE_CPU_TARGET_S_PER_MILLION,
                "s",
            )
        )
    return targets


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _targets_table(targets: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("target", "target value", "stretch", "measured", "met"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for target in targets:
        unit = target["unit"]
        table.add_row(
            target["target"],
            f"<= {target['limit']:,} {unit}",
            "-" if target["stretch"] is None else f"<= {target['stretch']:,} {unit}",
            f"{_fmt(target['value'], ',.2f')} {unit}",
            "[green]yes[/]" if target["met"] else "[red]NO[/]",
        )
    return table


def _setup_line(setup: dict[str, Any]) -> str:
    return (
        f"{setup['tenants']} tenants x {setup['pairs_per_tenant']:,} pairs = "
        f"{setup['pairs']:,} pairs"
        + (f" and {setup['jobs']:,} catalog jobs; " if setup["jobs"] else "; ")
        + f"median of {setup['repeat']}; page_size {setup['page_size']}; syncd: "
        f"{setup['max_concurrent_tenants']} tenants x {setup['max_concurrent_pages']} pages at "
        f"once; limit: {setup['limit_pages_per_tenant']} pages per tenant, "
        f"{setup['limit_pages_in_flight']} in all; {setup['cpus']} CPUs; PostgreSQL "
        f"{setup['postgres']['server_version']}; load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.2f}' for x in setup['loadavg_start'])} at start, "
        f"{', '.join(f'{x:.2f}' for x in setup['loadavg_end'])} at end"
    )


def render(report: dict[str, Any], console: Console) -> None:
    """Prints the report as tables."""
    setup = report["setup"]
    console.print(f"[bold]syncd sync benchmark[/]: {_setup_line(setup)}")
    table = Table()
    for column in (
        "phase",
        "scope",
        "seconds",
        "pairs/s",
        "x limit",
        "client CPU s",
        "PG CPU s",
        "PG db CPU s",
        "sim CPU s",
        "peak RSS MB",
        "1st request s",
        "link rows",
        "catalog rows",
        "run+tenant rows",
        "WAL MB",
    ):
        table.add_column(column, justify="left" if column in ("phase", "scope") else "right")
    for phase, figures in report["phases"].items():
        written = figures["rows_written"]
        rss = _fmt(figures["peak_rss_mb"], ".0f")
        if figures.get("baseline_rss_mb") is not None:
            rss += f" ({figures['baseline_rss_mb']:.0f})"
        table.add_row(
            PHASE_TITLES[phase],
            figures["scope"],
            _fmt(figures["seconds"]),
            _fmt(figures["pairs_per_s"], ",.0f"),
            _fmt(figures["ratio_to_limit"]),
            _fmt(figures.get("client_cpu_s")),
            _fmt(figures.get("pg_cpu_s")),
            _fmt(figures.get("pg_database_cpu_s")),
            _fmt(figures.get("simulator_cpu_s")),
            rss,
            _fmt(figures.get("first_request_s"), ".3f"),
            _fmt(written["links"], ",.0f"),
            _fmt(written["catalog_items"], ",.0f"),
            _fmt(written["runs"] + written["tenants"], ",.0f"),
            _fmt(figures["wal_bytes"] / MB, ".2f"),
        )
    console.print(table)
    limit = report["phases"].get(LIMIT)
    if limit:
        console.print(
            f"x limit: whole processes against the limit's whole process "
            f"({limit['seconds']:.2f} s); in-process phases against its time from first "
            f"request to last row ({_fmt(limit.get('inner_s'))} s)."
        )
    fetch = report["phases"].get("fetch")
    if fetch and fetch.get("ratio_to_limit_fetch") is not None:
        console.print(
            f"syncd fetch-only {fetch['seconds']:.2f} s = {fetch['ratio_to_limit_fetch']:.2f}x "
            "the plain aiohttp fetch of the same pages (first request to last page parsed)."
        )
    startup = report["startup"]
    console.print(
        f"`syncd --version`: median {_fmt(startup['version_s'], '.3f')} s of "
        f"{len(startup['version_runs_s'])} runs."
    )
    parse = report["phases"].get("parse")
    if parse:
        console.print(
            f"parse+check: {parse['items_parsed']:,} items in {parse['parse_cpu_s']:.2f} s CPU; "
            f"raw fetch of the same pages with plain aiohttp {parse['raw_fetch_s']:.2f} s"
        )
    console.print(
        "peak RSS: the measured process's high-water mark (in-process phases: its RSS before "
        "the phase in brackets). PG CPU: the whole server's (other databases' sessions "
        "included); PG db CPU: this database's backends alone, sampled (whole processes only)."
    )
    quiet = [
        report["phases"][p]["wal_bytes"]
        for p in ("parse", "fetch", "limit_fetch")
        if p in report["phases"]
    ]
    if quiet and max(quiet) > 100_000:
        console.print(
            f"[yellow]WAL is cluster-wide and other sessions wrote {max(quiet) / MB:.2f} MB during "
            "phases that write none: WAL figures include their share.[/]"
        )
    console.print(_targets_table(report["targets"], "targets (issue #16)"))
    bloat = report.get("bloat")
    if bloat:
        sizes = Table(title=f"syncd.links after {bloat['rounds']} churn re-syncs")
        for column in ("", "before", "after", "after VACUUM"):
            sizes.add_column(column, justify="right")
        states = (bloat["before"], bloat["after"], bloat["after_vacuum"])
        sizes.add_row("rows (open)", *(f"{s['rows']:,} ({s['open_rows']:,})" for s in states))
        sizes.add_row("dead tuples", *(f"{s['n_dead_tup']:,}" for s in states))
        sizes.add_row("heap MB", *(_fmt(s["heap_bytes"] / MB) for s in states))
        for index in bloat["before"]["indexes"]:
            sizes.add_row(f"{index} MB", *(_fmt(s["indexes"][index] / MB) for s in states))
        sizes.add_row("total MB", *(_fmt(s["total_bytes"] / MB) for s in states))
        console.print(sizes)
        console.print(
            f"churn re-sync seconds: first {_fmt(bloat['first_round_s'])}, "
            f"median {_fmt(bloat['median_round_s'])}, last {_fmt(bloat['last_round_s'])}"
        )


# --- scaling ------------------------------------------------------------------------------


def scaling_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Microseconds per link of each phase at each size, and each size's ratio to the
    first size's; the targets judge the syncs of the second and third sizes."""
    sizes = []
    for report in reports:
        setup = report["setup"]
        sizes.append(
            {
                "tenants": setup["tenants"],
                "pairs_per_tenant": setup["pairs_per_tenant"],
                "pairs": setup["pairs"],
                "loadavg_start": setup["loadavg_start"],
                "loadavg_end": setup["loadavg_end"],
                "seconds": {p: f["seconds"] for p, f in report["phases"].items()},
                "us_per_link": {
                    p: f["seconds"] * 1e6 / setup["pairs"] for p, f in report["phases"].items()
                },
                "ratio_to_limit": {p: f["ratio_to_limit"] for p, f in report["phases"].items()},
                "peak_rss_mb": {p: f["peak_rss_mb"] for p, f in report["phases"].items()},
            }
        )
    reference = sizes[0]
    for size in sizes:
        size["per_link_vs_first"] = {
            phase: _ratio(per_link, reference["us_per_link"].get(phase))
            for phase, per_link in size["us_per_link"].items()
        }
    targets = []
    for size, growth in zip(sizes[1:], SCALING_GROWTH_LIMITS, strict=False):
        for phase in ("initial", "noop", "churn"):
            name = (
                f"{phase}: time per link, {size['tenants']:,}x{size['pairs_per_tenant']:,} vs "
                f"{reference['tenants']:,}x{reference['pairs_per_tenant']:,}"
            )
            targets.append(_target(name, size["per_link_vs_first"].get(phase), growth, "x"))
    return {"sizes": sizes, "targets": targets}


def render_scaling(scaling: dict[str, Any], console: Console) -> None:
    """Prints the scaling study: time per link by size, and the targets."""
    table = Table(title="scaling: microseconds per link (seconds; ratio to the first size)")
    table.add_column("size")
    table.add_column("pairs", justify="right")
    phases = list(scaling["sizes"][0]["us_per_link"])
    for phase in phases:
        table.add_column(PHASE_TITLES[phase], justify="right")
    table.add_column("load avg (1 min) start/end", justify="right")
    for size in scaling["sizes"]:
        table.add_row(
            f"{size['tenants']:,} x {size['pairs_per_tenant']:,}",
            f"{size['pairs']:,}",
            *(
                f"{_fmt(size['us_per_link'].get(p))} ({_fmt(size['seconds'].get(p))} s; "
                f"{_fmt(size['per_link_vs_first'].get(p))}x)"
                for p in phases
            ),
            f"{size['loadavg_start'][0]:.2f} / {size['loadavg_end'][0]:.2f}",
        )
    console.print(table)
    console.print(_targets_table(scaling["targets"], "scaling targets (issue #16)"))


# --- main ---------------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    tenants, _, pairs = text.partition("x")
    return int(tenants), int(pairs)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line."""
    defaults = config.SyncSettings()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sync",
        description=f"End-to-end sync benchmark (database server: ${DATABASE_URL_ENV}, "
        f"default {DEFAULT_DATABASE_URL}).",
    )
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--pairs-per-tenant", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3, help="median of this many runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--bloat-rounds", type=int, default=0, help="churn re-syncs of the bloat study"
    )
    parser.add_argument(
        "--in-process-syncs",
        action="store_true",
        help="also run initial/no-op/churn in-process (sync.sync_tenants), for profiles",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="instead: the limit and the three syncs at each of --scaling-sizes, time per "
        "link compared (minutes and gigabytes; --tenants/--pairs-per-tenant are ignored)",
    )
    parser.add_argument(
        "--scaling-sizes",
        type=lambda text: [_size(size) for size in text.split(",")],
        default=[_size(size) for size in DEFAULT_SCALING_SIZES.split(",")],
        help=f"TENANTSxPAIRS,... (default {DEFAULT_SCALING_SIZES}); the first is the "
        "reference of the others",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--collections",
        type=lambda text: text.split(","),
        default=None,
        help="[sync] collections, comma-separated (default: all; the links alone: "
        "backup_copy_job_objects)",
    )
    parser.add_argument(
        "--jobs-per-tenant",
        type=int,
        default=0,
        help="a catalog of this many jobs per tenant, besides the links (default: none)",
    )
    parser.add_argument("--page-size", type=int, default=defaults.page_size)
    parser.add_argument("--max-concurrent-pages", type=int, default=defaults.max_concurrent_pages)
    parser.add_argument(
        "--max-concurrent-tenants", type=int, default=config.DaemonConfig().max_concurrent_tenants
    )
    parser.add_argument(
        "--limit-pages-per-tenant",
        type=int,
        default=LIMIT_PAGES_PER_TENANT,
        help="the limit's pages of one tenant in flight",
    )
    parser.add_argument(
        "--limit-pages-in-flight",
        type=int,
        default=LIMIT_PAGES_IN_FLIGHT,
        help="the limit's pages in flight in all",
    )
    return parser


async def run_size(
    args: argparse.Namespace,
    *,
    tenants: int,
    pairs_per_tenant: int,
    phases: Sequence[str],
    bloat_rounds: int = 0,
) -> dict[str, Any]:
    """The benchmark at one size: a simulator and a database of their own; the report."""
    server_url = os.environ.get(DATABASE_URL_ENV, DEFAULT_DATABASE_URL)
    loadavg_start = os.getloadavg()
    started = time.perf_counter()
    simulator = await asyncio.to_thread(
        SimulatorProcess,
        tenants=tenants,
        pairs=pairs_per_tenant,
        seed=args.seed,
        page_size=min(args.page_size, paging.MAX_PAGE_SIZE),
        jobs_per_tenant=args.jobs_per_tenant,
    )
    _progress(
        f"simulator ready at {simulator.url} in {time.perf_counter() - started:.1f}s "
        f"(pages warmed in {simulator.warm_s:.1f}s)"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="syncd-bench-") as workdir:
            async with bench_database(server_url) as url:
                benchmark = Benchmark(args, simulator, url, Path(workdir))
                for _ in range(args.repeat):
                    await benchmark.repeat_once(phases)
                bloat = await benchmark.bloat(bloat_rounds) if bloat_rounds else None
                postgres = await server_facts(url)
    finally:
        await asyncio.to_thread(simulator.stop)
    summary = summarize(benchmark.runs)
    return {
        "setup": {
            "tenants": tenants,
            "pairs_per_tenant": pairs_per_tenant,
            "pairs": simulator.pairs,
            "jobs": simulator.jobs,
            "database": make_url(url).database,
            "repeat": args.repeat,
            "page_size": args.page_size,
            "max_concurrent_pages": args.max_concurrent_pages,
            "max_concurrent_tenants": args.max_concurrent_tenants,
            "limit_pages_per_tenant": args.limit_pages_per_tenant,
            "limit_pages_in_flight": args.limit_pages_in_flight,
            "collections": args.collections,
            "syncd_command": syncd_command(),
            "cpus": os.cpu_count(),
            "postgres": postgres,
            "simulator_warm_s": simulator.warm_s,
            "churn_fraction": CHURN_FRACTION,
            "churned": benchmark.churned,
            "loadavg_start": loadavg_start,
            "loadavg_end": os.getloadavg(),
        },
        "phases": summary,
        "bloat": bloat,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the whole benchmark (or the scaling study); the report."""
    versions = await asyncio.to_thread(version_seconds, VERSION_RUNS)
    startup = {"version_s": statistics.median(versions), "version_runs_s": versions}
    if args.scaling:
        reports = []
        for tenants, pairs_per_tenant in args.scaling_sizes:
            _progress(f"scaling: {tenants:,} tenants x {pairs_per_tenant:,} pairs")
            reports.append(
                await run_size(
                    args, tenants=tenants, pairs_per_tenant=pairs_per_tenant, phases=SCALING_PHASES
                )
            )
        return {"startup": startup, "scaling": scaling_summary(reports), "reports": reports}
    phases = [p for p in PHASES if args.in_process_syncs or p not in IN_PROCESS_SYNCS]
    report = await run_size(
        args,
        tenants=args.tenants,
        pairs_per_tenant=args.pairs_per_tenant,
        phases=phases,
        bloat_rounds=args.bloat_rounds,
    )
    report["startup"] = startup
    report["targets"] = evaluate_targets(report["phases"], startup)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m benchmarks.sync`."""
    args = build_parser().parse_args(argv)
    try:
        report = asyncio.run(run(args))
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    console = Console(width=190)
    if args.scaling:
        for size_report in report["reports"]:
            size_report["startup"] = report["startup"]
            size_report["targets"] = evaluate_targets(size_report["phases"], report["startup"])
            render(size_report, console)
        render_scaling(report["scaling"], console)
    else:
        render(report, console)
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
