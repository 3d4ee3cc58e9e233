"""End-to-end sync benchmark: `python -m benchmarks.sync [--tenants T] [--pairs-per-tenant N]`.

Starts the simulator (`benchmarks.simserver`) in its own process with every page body cached,
creates a fresh database `syncd_bench_<pid>` on `$SYNCD_BENCH_DATABASE_URL`'s server, and
measures, `--repeat` times each (median reported), every phase in a fresh process
(`benchmarks.phases`):

  parse       the client's parse+check CPU alone, over raw page bodies
  fetch       syncd's client reads every page of every tenant (fetch-only limit)
  fetch_copy  the same plus COPY into an UNLOGGED table without indexes (fetch+copy limit)
  initial     `sync_all` into empty tables
  noop        `sync_all` again, nothing changed
  churn       `sync_all` after 1% of each tenant's pairs were removed and 1% added

`--bloat-rounds R` then runs R more churn re-syncs and reports the size of `syncd.links` and
its indexes before, after, and after a VACUUM. Prints a table; `--json PATH` writes the same
figures. Exits 1 when a sync did not succeed (the figures would mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import asyncpg
import orjson
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from benchmarks.phases import SYNCD_TABLES, PhaseSpec
from syncd import config, db, models, paging

DATABASE_URL_ENV = "SYNCD_BENCH_DATABASE_URL"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CHURN_FRACTION = 0.01
PHASES = ("parse", "fetch", "fetch_copy", "initial", "noop", "churn")
PHASE_TITLES = {
    "parse": "parse+check only",
    "fetch": "fetch-only limit",
    "fetch_copy": "fetch+copy limit",
    "initial": "initial sync",
    "noop": "no-op re-sync",
    "churn": "1% churn re-sync",
}
# (phase, largest ratio to fetch_copy) of the performance targets.
RATIO_TARGETS = {"initial": 4.0, "noop": 2.0, "churn": 2.5}
PEAK_RSS_TARGET_MB = 200.0
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
    return figures


class Benchmark:
    """One benchmark run: a simulator, a database, and the figures gathered so far."""

    def __init__(self, args: argparse.Namespace, simulator: SimulatorProcess, url: str) -> None:
        self.args = args
        self.simulator = simulator
        self.url = url
        self.runs: dict[str, list[dict[str, Any]]] = {phase: [] for phase in PHASES}
        self.churned: list[dict[str, Any]] = []

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

    async def measure(self, label: str, phase: str) -> dict[str, Any]:
        """Checkpoints (so every phase starts with the same WAL full-page-image debt), then
        runs `phase` and files its figures under `label`."""
        await _execute(self.url, "CHECKPOINT")
        figures = await asyncio.to_thread(run_phase, self.spec(phase))
        self.runs[label].append(figures)
        _progress(f"{label}: {figures['seconds']:.2f}s")
        return figures

    async def repeat_once(self) -> None:
        """Every phase once, in order; syncd's tables are emptied first."""
        await self.measure("parse", "parse")
        await self.measure("fetch", "fetch")
        await self.measure("fetch_copy", "fetch_copy")
        # Every table of syncd's, so a foreign key to one of them never stops the TRUNCATE.
        tables = ", ".join(table.fullname for table in models.metadata.sorted_tables)
        await _execute(self.url, f"TRUNCATE {tables} RESTART IDENTITY")
        await self.measure("initial", "sync")
        await self.measure("noop", "sync")
        self.churned.append(await asyncio.to_thread(self.simulator.churn, CHURN_FRACTION))
        await self.measure("churn", "sync")

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


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


# --- figures ------------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Median of each figure over the repeats, plus derived rates and ratios."""
    summary: dict[str, dict[str, Any]] = {}
    for phase, measured in runs.items():
        if not measured:
            continue
        figures: dict[str, Any] = {}
        for key in (
            "seconds",
            "syncd_cpu_s",
            "pg_cpu_s",
            "simulator_cpu_s",
            "baseline_rss_mb",
            "peak_rss_mb",
            "wal_bytes",
            "pairs",
            "added",
            "removed",
            "raw_fetch_s",
            "parse_cpu_s",
            "items_parsed",
        ):
            if key in measured[0]:
                figures[key] = _median([run[key] for run in measured])
        figures["rows_written"] = {
            table: _median([run["rows_written"][table] for run in measured])
            for table in SYNCD_TABLES
        }
        figures["pairs_per_s"] = figures["pairs"] / figures["seconds"]
        figures["runs"] = measured
        summary[phase] = figures
    limit = summary.get("fetch_copy", {}).get("seconds")
    for figures in summary.values():
        figures["ratio_to_fetch_copy"] = figures["seconds"] / limit if limit else None
    return summary


def evaluate_targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each performance target with the measured value and whether it is met."""
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, unit: str) -> None:
        targets.append(
            {
                "target": name,
                "value": value,
                "limit": limit,
                "unit": unit,
                "met": value is not None and value <= limit,
            }
        )

    for phase, ratio in RATIO_TARGETS.items():
        if phase in summary:
            add(f"{phase} / fetch_copy", summary[phase]["ratio_to_fetch_copy"], ratio, "x")
    if "noop" in summary:
        add("noop link rows written", summary["noop"]["rows_written"]["links"], 0, "rows")
        add("noop WAL", summary["noop"]["wal_bytes"], NOOP_WAL_TARGET_BYTES, "bytes")
    if "churn" in summary:
        churn = summary["churn"]
        # An added pair is one row insert, a removed one one row update; nothing else.
        changed = churn["added"] + churn["removed"]
        add(
            "churn link rows written - changed pairs",
            churn["rows_written"]["links"] - changed,
            0,
            "rows",
        )
    sync_phases = [phase for phase in ("initial", "noop", "churn") if phase in summary]
    if sync_phases:
        add(
            "peak RSS of syncd (sync phases)",
            max(summary[phase]["peak_rss_mb"] for phase in sync_phases),
            PEAK_RSS_TARGET_MB,
            "MB",
        )
    if "parse" in summary:
        parse = summary["parse"]
        add(
            "parse+check CPU per 1M items",
            parse["parse_cpu_s"] * 1_000_000 / max(1, parse["items_parsed"]),
            PARSE_CPU_TARGET_S_PER_MILLION,
            "s",
        )
    return targets


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def render(report: dict[str, Any], console: Console) -> None:
    """Prints the report as tables."""
    setup = report["setup"]
    console.print(
        f"[bold]syncd sync benchmark[/]: {setup['tenants']} tenants x "
        f"{setup['pairs_per_tenant']:,} pairs = {setup['pairs']:,} pairs"
        + (f" and {setup['jobs']:,} catalog jobs; " if setup["jobs"] else "; ")
        + f"median of {setup['repeat']}; page_size {setup['page_size']}, "
        f"{setup['max_concurrent_tenants']} tenants x {setup['max_concurrent_pages']} pages "
        f"at once; {setup['cpus']} CPUs; PostgreSQL {setup['postgres']['server_version']}"
    )
    table = Table()
    for column in (
        "phase",
        "seconds",
        "pairs/s",
        "x fetch+copy",
        "syncd CPU s",
        "PG CPU s",
        "sim CPU s",
        "peak RSS MB",
        "link rows",
        "catalog rows",
        "run+tenant rows",
        "WAL MB",
    ):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase, figures in report["phases"].items():
        written = figures["rows_written"]
        table.add_row(
            PHASE_TITLES[phase],
            _fmt(figures["seconds"]),
            _fmt(figures["pairs_per_s"], ",.0f"),
            _fmt(figures["ratio_to_fetch_copy"]),
            _fmt(figures["syncd_cpu_s"]),
            _fmt(figures["pg_cpu_s"]),
            _fmt(figures["simulator_cpu_s"]),
            f"{_fmt(figures['peak_rss_mb'], '.0f')} ({_fmt(figures['baseline_rss_mb'], '.0f')})",
            _fmt(written["links"], ",.0f"),
            _fmt(written["catalog_items"], ",.0f"),
            _fmt(written["runs"] + written["tenants"], ",.0f"),
            _fmt(figures["wal_bytes"] / MB, ".2f"),
        )
    console.print(table)
    parse = report["phases"].get("parse")
    if parse:
        console.print(
            f"parse+check: {parse['items_parsed']:,} items in {parse['parse_cpu_s']:.2f} s CPU; "
            f"raw fetch of the same pages with plain aiohttp {parse['raw_fetch_s']:.2f} s"
        )
    console.print(
        "peak RSS: the phase process's high-water mark (its RSS before the phase in brackets)."
    )
    quiet = [report["phases"][p]["wal_bytes"] for p in ("parse", "fetch") if p in report["phases"]]
    if quiet and max(quiet) > 100_000:
        console.print(
            f"[yellow]WAL is cluster-wide and other sessions wrote {max(quiet) / MB:.2f} MB during "
            "phases that write none: WAL figures include their share.[/]"
        )
    targets = Table(title="targets")
    for column in ("target", "value", "limit", "met"):
        targets.add_column(column)
    for target in report["targets"]:
        targets.add_row(
            target["target"],
            f"{_fmt(target['value'], ',.2f')} {target['unit']}",
            f"{target['limit']:,} {target['unit']}",
            "[green]yes[/]" if target["met"] else "[red]NO[/]",
        )
    console.print(targets)
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


# --- main ---------------------------------------------------------------------------------


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
    return parser


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the whole benchmark; the report."""
    server_url = os.environ.get(DATABASE_URL_ENV, DEFAULT_DATABASE_URL)
    started = time.perf_counter()
    simulator = await asyncio.to_thread(
        SimulatorProcess,
        tenants=args.tenants,
        pairs=args.pairs_per_tenant,
        seed=args.seed,
        page_size=min(args.page_size, paging.MAX_PAGE_SIZE),
        jobs_per_tenant=args.jobs_per_tenant,
    )
    _progress(
        f"simulator ready at {simulator.url} in {time.perf_counter() - started:.1f}s "
        f"(pages warmed in {simulator.warm_s:.1f}s)"
    )
    try:
        async with bench_database(server_url) as url:
            benchmark = Benchmark(args, simulator, url)
            for _ in range(args.repeat):
                await benchmark.repeat_once()
            bloat = await benchmark.bloat(args.bloat_rounds) if args.bloat_rounds else None
            postgres = await server_facts(url)
    finally:
        await asyncio.to_thread(simulator.stop)
    summary = summarize(benchmark.runs)
    return {
        "setup": {
            "tenants": args.tenants,
            "pairs_per_tenant": args.pairs_per_tenant,
            "pairs": simulator.pairs,
            "jobs": simulator.jobs,
            "database": make_url(url).database,
            "repeat": args.repeat,
            "page_size": args.page_size,
            "max_concurrent_pages": args.max_concurrent_pages,
            "max_concurrent_tenants": args.max_concurrent_tenants,
            "collections": args.collections,
            "cpus": os.cpu_count(),
            "postgres": postgres,
            "simulator_warm_s": simulator.warm_s,
            "churn_fraction": CHURN_FRACTION,
            "churned": benchmark.churned,
        },
        "phases": summary,
        "targets": evaluate_targets(summary),
        "bloat": bloat,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m benchmarks.sync`."""
    args = build_parser().parse_args(argv)
    try:
        report = asyncio.run(run(args))
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    render(report, Console(width=170))
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
