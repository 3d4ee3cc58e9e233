"""Replicas benchmark: `python -m benchmarks.replicas [--replicas 1 2 4] [--seconds 40]`.

For each replica count N: a fresh database `syncd_bench_<pid>`, the simulator
(`benchmarks.simserver`, every page cached) in its own process, and N `syncd run`
processes (`replica_name` r1..rN) sharing `--tenants` tenants on a short `--interval`.
After every tenant's first run it observes a window of `--seconds` on the database's clock
and reports, from `syncd.runs`:

- runs per tenant per interval (mean, min, max): 1.0 means each tenant ran once per interval
  in total, however many replicas there are;
- the spread: each replica's share of the runs (1/N each when the work is shared evenly);
- per replica: peak RSS, CPU per run (syncd's processes; PostgreSQL's backends of this
  database only, since the server may serve other work), and the connections it held
  (`pg_stat_activity`; the pool allows `max_concurrent_tenants` + 2).

Prints a table; `--json PATH` writes the same figures. Needs a PostgreSQL server where it
may create a database: `$SYNCD_BENCH_DATABASE_URL` (default
postgresql://postgres@127.0.0.1:5432/postgres), on this machine for the PostgreSQL CPU.
Not a test: nothing here is asserted, except that every run succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import psutil  # type: ignore[import-untyped]
from rich.console import Console
from rich.table import Table

from benchmarks.sync import (
    DATABASE_URL_ENV,
    DEFAULT_DATABASE_URL,
    SimulatorProcess,
    bench_database,
)
from syncd import config

REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000


def write_config(
    path: Path,
    *,
    database_url: str,
    simulator: SimulatorProcess,
    replica: str,
    interval_s: float,
    max_concurrent_tenants: int,
) -> None:
    """One replica's config: every simulated tenant on `interval_s`, the endpoint on port 0."""
    lines = [
        "[database]",
        f'url = "{database_url}"',
        "[sync]",
        f'interval = "{interval_s:g}s"',
        "[daemon]",
        'listen = "127.0.0.1:0"',
        f'replica_name = "{replica}"',
        f'startup_spread = "{interval_s:g}s"',
        f"max_concurrent_tenants = {max_concurrent_tenants}",
    ]
    for name, api_key in simulator.tenants:
        lines += ["[[tenants]]", f'name = "{name}"', f'url = "{simulator.url}"']
        lines.append(f'api_key = "{api_key}"')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)


class Replica:
    """A `syncd run` child process, its stderr in a file, sampled with psutil."""

    def __init__(self, name: str, config_path: Path, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
        env["PYTHONPATH"] = str(REPO)
        with log_path.open("wb") as log:
            self.process = psutil.Popen(
                [sys.executable, "-m", "syncd.cli", "--config", str(config_path), "run"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        self.peak_rss_mb = 0.0

    def cpu_s(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak_rss_mb = max(self.peak_rss_mb, self.process.memory_info().rss / MB)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return int(self.process.wait(timeout=60))
        except psutil.TimeoutExpired:
            self.process.kill()
            return int(self.process.wait())


async def _backends_cpu_s(connection: asyncpg.Connection) -> dict[int, float]:
    """CPU seconds so far of each backend serving syncd in this database (by pid).

    Only this database's backends: the server may be busy with other work, whose CPU the
    postmaster-wide figure of `benchmarks.phases.PgProbe` would count.
    """
    pids = await connection.fetch(
        "SELECT pid FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'syncd'"
    )
    found = {}
    for row in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(row["pid"]).cpu_times()
            found[int(row["pid"])] = float(times.user + times.system)
    return found


async def _now(connection: asyncpg.Connection) -> datetime:
    now: datetime = await connection.fetchval("SELECT now()")
    return now


@dataclass
class Window:
    """What was measured while the replicas ran, between `start` and `end` (database clock)."""

    start: datetime
    end: datetime
    syncd_cpu_s: list[float]
    pg_cpu_s: float
    connections: list[int]


async def _observe(
    args: argparse.Namespace,
    connection: asyncpg.Connection,
    tenants: int,
    replicas: list[Replica],
) -> Window:
    """Waits for every tenant's first run, then measures a window of `args.seconds`."""
    deadline = time.monotonic() + 60 + 3 * args.interval
    while True:
        synced = await connection.fetchval(
            "SELECT count(DISTINCT tenant_id) FROM syncd.runs WHERE status = 'succeeded'"
        )
        if synced == tenants:
            break
        if time.monotonic() > deadline or any(r.process.poll() is not None for r in replicas):
            logs = "\n".join(r.log_path.read_text()[-3000:] for r in replicas)
            raise RuntimeError(f"replicas did not sync every tenant:\n{logs}")
        await asyncio.sleep(0.2)
    start = await _now(connection) + timedelta(seconds=args.interval)
    end = start + timedelta(seconds=args.seconds)
    await asyncio.sleep((start - await _now(connection)).total_seconds())
    cpu_before = [replica.cpu_s() for replica in replicas]
    pg_before = await _backends_cpu_s(connection)
    connections: list[int] = []
    while await _now(connection) < end:
        for replica in replicas:
            replica.sample()
        connections.append(
            await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'syncd'"
            )
        )
        await asyncio.sleep(0.5)
    cpu = [r.cpu_s() - before for r, before in zip(replicas, cpu_before, strict=True)]
    pg_after = await _backends_cpu_s(connection)
    # Backends that began during the window count whole; any that ended are missed.
    pg_cpu = sum(after - pg_before.get(pid, 0.0) for pid, after in pg_after.items())
    return Window(start, end, cpu, pg_cpu, connections)


async def measure(
    args: argparse.Namespace, server_url: str, simulator: SimulatorProcess, count: int
) -> dict[str, Any]:
    """One replica count: start, warm up, observe the window, stop; the figures."""
    names = [f"r{index}" for index in range(1, count + 1)]
    async with bench_database(server_url) as url:
        connection = await asyncpg.connect(url)
        try:
            with tempfile.TemporaryDirectory(prefix="syncd-bench-replicas-") as work:
                replicas = []
                for name in names:
                    path = Path(work) / f"{name}.toml"
                    write_config(
                        path,
                        database_url=url,
                        simulator=simulator,
                        replica=name,
                        interval_s=args.interval,
                        max_concurrent_tenants=args.max_concurrent_tenants,
                    )
                    replicas.append(Replica(name, path, Path(work) / f"{name}.log"))
                try:
                    window = await _observe(args, connection, len(simulator.tenants), replicas)
                finally:
                    codes = [replica.stop() for replica in replicas]
            rows = await connection.fetch(
                "SELECT tenant_id, replica, status FROM syncd.runs "
                "WHERE started_at >= $1 AND started_at < $2",
                window.start,
                window.end,
            )
        finally:
            await connection.close()
    intervals = args.seconds / args.interval
    per_tenant = collections.Counter(row["tenant_id"] for row in rows)
    # A tenant that never ran in the window counts as 0.
    rates = [runs / intervals for runs in per_tenant.values()]
    rates += [0.0] * (len(simulator.tenants) - len(per_tenant))
    per_replica = collections.Counter(row["replica"] for row in rows)
    runs = max(len(rows), 1)
    return {
        "replicas": count,
        "exit_codes": codes,
        "runs": len(rows),
        "not_succeeded": sum(1 for row in rows if row["status"] != "succeeded"),
        "runs_per_tenant_per_interval": {
            "mean": statistics.fmean(rates),
            "min": min(rates),
            "max": max(rates),
        },
        "share": {name: per_replica.get(name, 0) / runs for name in names},
        "peak_rss_mb": {replica.name: round(replica.peak_rss_mb, 1) for replica in replicas},
        "syncd_cpu_ms_per_run": 1000 * sum(window.syncd_cpu_s) / runs,
        "syncd_cpu_share_of_a_core": {
            replica.name: round(seconds / args.seconds, 3)
            for replica, seconds in zip(replicas, window.syncd_cpu_s, strict=True)
        },
        "pg_cpu_ms_per_run": 1000 * window.pg_cpu_s / runs,
        "connections_per_replica": max(window.connections) / count,
        "pool_size": args.max_concurrent_tenants + 2,
    }


def render(report: dict[str, Any], console: Console) -> None:
    setup = report["setup"]
    table = Table(
        title=(
            f"{setup['tenants']} tenants x {setup['pairs_per_tenant']} pairs, every "
            f"{setup['interval_s']:g}s, observed {setup['seconds']:g}s"
        )
    )
    for column in (
        "replicas",
        "runs/tenant/interval (min-max)",
        "share per replica",
        "peak RSS MB",
        "syncd CPU ms/run",
        "PG CPU ms/run",
        "connections/replica",
    ):
        table.add_column(column)
    for result in report["results"]:
        rate = result["runs_per_tenant_per_interval"]
        shares = " ".join(f"{share:.0%}" for share in result["share"].values())
        rss = " ".join(f"{value:.0f}" for value in result["peak_rss_mb"].values())
        table.add_row(
            str(result["replicas"]),
            f"{rate['mean']:.3f} ({rate['min']:.2f}-{rate['max']:.2f})",
            shares,
            rss,
            f"{result['syncd_cpu_ms_per_run']:.1f}",
            f"{result['pg_cpu_ms_per_run']:.1f}",
            f"{result['connections_per_replica']:.1f}",
        )
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.replicas",
        description="Runs 1, 2, 4 (--replicas) syncd replicas on one database and reports "
        "runs per tenant per interval and the spread.",
    )
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tenants", type=int, default=40)
    parser.add_argument("--pairs-per-tenant", type=int, default=200)
    parser.add_argument("--interval", type=float, default=4.0, help="seconds")
    parser.add_argument("--seconds", type=float, default=40.0, help="observed window")
    parser.add_argument("--max-concurrent-tenants", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    return parser


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server_url = os.environ.get(DATABASE_URL_ENV, DEFAULT_DATABASE_URL)
    simulator = SimulatorProcess(
        tenants=args.tenants,
        pairs=args.pairs_per_tenant,
        seed=args.seed,
        page_size=config.SyncSettings().page_size,
    )
    try:
        results = []
        for count in args.replicas:
            print(f"{count} replica(s)...", file=sys.stderr, flush=True)
            results.append(await measure(args, server_url, simulator, count))
    finally:
        simulator.stop()
    return {
        "setup": {
            "tenants": args.tenants,
            "pairs_per_tenant": args.pairs_per_tenant,
            "interval_s": args.interval,
            "seconds": args.seconds,
            "max_concurrent_tenants": args.max_concurrent_tenants,
            "cpus": os.cpu_count(),
        },
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = asyncio.run(run(args))
    render(report, Console(width=160))
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    ok = all(
        result["exit_codes"] == [0] * result["replicas"] and result["not_succeeded"] == 0
        for result in report["results"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
