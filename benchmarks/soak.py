"""Soak test, run on demand (not collected by pytest): `python -m benchmarks.soak --minutes 10`.

`syncd run` syncs 50 tenants at short intervals for N minutes against a simulator process
in which about 5% of requests fail in assorted ways (429, 520, malformed or truncated JSON,
hangs, 202s, bad items, changing totals, revoked tokens, drift), while VSPC's data churns.
Every `--sample-s` it prints the daemon's RSS, PostgreSQL connections and runs by status.
At the end it clears the faults, stops the daemon with SIGTERM, runs one clean
`syncd sync`, and checks that every tenant's copy is exact and the history sound.

Exit code 0 when every check passed. Needs a PostgreSQL server it may create a database on:
`--server-url` (default `$SYNCD_SOAK_SERVER_URL`, else postgresql://postgres@127.0.0.1:5432/).

The simulator runs as `python -m benchmarks.soak simulator ...`: it prints one JSON line
(url, tenants) when ready and then obeys one command per stdin line: `churn <fraction>`,
`clear` (faults), `dump <path>` (every tenant's pairs as JSON) and `quit`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import psutil  # type: ignore[import-untyped]

from syncd import simulator as sim

# Each kind fails about 0.5% of the requests it can apply to: about 5% in all.
FAULT_MIX: tuple[tuple[str, dict[str, Any]], ...] = (
    ("429", {"retry_after_s": 0.2}),
    ("520", {}),
    ("malformed_json", {}),
    ("truncated", {}),
    ("hang", {}),
    ("async202", {"polls": 1}),
    ("bad_uuid", {}),
    ("wrong_total", {}),
    ("drift", {}),
    ("401", {}),
)
PASSWORD_TENANT_EVERY = 5  # every 5th tenant logs in with a password (tokens, refreshes)
TOKEN_LIFETIME_S = 30.0


# --- the simulator process -----------------------------------------------------------------


async def serve_simulator(args: argparse.Namespace) -> None:
    dataset = sim.make_dataset(tenants=args.tenants, pairs_per_tenant=args.pairs, seed=args.seed)
    state = sim.SimulatorState(dataset, seed=args.seed, token_lifetime_s=TOKEN_LIFETIME_S)
    state.hang_s = 30.0

    def arm() -> None:
        each = args.fault_rate / len(FAULT_MIX)
        for kind, options in FAULT_MIX:
            state.inject(sim.Fault(kind=kind, probability=each, times=None, **options))
        state.inject(sim.Fault(kind="latency", probability=0.05, delay_s=0.2, times=None))

    arm()
    async with sim.run_simulator(state) as url:
        ready = {
            "url": url,
            "pid": os.getpid(),
            "tenants": [
                {
                    "name": t.name,
                    "api_key": t.api_key,
                    "username": t.username,
                    "password": t.password,
                }
                for t in dataset
            ],
        }
        print(json.dumps(ready), flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().strip():
            command, _, argument = line.partition(" ")
            if command == "churn":
                for tenant in dataset:
                    state.churn(tenant.name, float(argument))
                answer: dict[str, Any] = {"ok": True}
            elif command == "clear":
                state.clear_faults()
                answer = {"ok": True, "faults_fired": dict(state.faults_fired)}
            elif command == "dump":
                pairs = {
                    t.name: sorted(
                        [i["jobUid"], i.get("uniqueJobUid"), i["linkedJobUid"]] for i in t.items
                    )
                    for t in dataset
                }
                await asyncio.to_thread(Path(argument).write_bytes, orjson.dumps(pairs))
                answer = {"ok": True}
            elif command == "stats":
                answer = {
                    "requests_by_status": {str(k): v for k, v in state.requests_by_status.items()},
                    "faults_fired": dict(state.faults_fired),
                    "token_grants": dict(state.token_grants),
                }
            elif command == "quit":
                break
            else:
                answer = {"ok": False, "error": f"unknown command {command!r}"}
            print(json.dumps(answer), flush=True)


# --- the orchestrator ----------------------------------------------------------------------


class Simulator:
    """The simulator subprocess and its line protocol."""

    def __init__(self, process: asyncio.subprocess.Process, ready: dict[str, Any]) -> None:
        self.process = process
        self.url: str = ready["url"]
        self.tenants: list[dict[str, str]] = ready["tenants"]

    @classmethod
    async def start(cls, args: argparse.Namespace) -> Simulator:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.soak",
            "simulator",
            "--tenants",
            str(args.tenants),
            "--pairs",
            str(args.pairs),
            "--fault-rate",
            str(args.fault_rate),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 120)
        return cls(process, json.loads(line))

    async def command(self, text: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(text.encode() + b"\n")
        await self.process.stdin.drain()
        answer: dict[str, Any] = json.loads(await self.process.stdout.readline())
        return answer

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(Exception):
                await self.command("quit")
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
        await self.process.wait()


def write_config(
    path: Path, database_url: str, simulator: Simulator, args: argparse.Namespace
) -> None:
    lines = [
        "[database]",
        f'url = "{database_url}"',
        "",
        "[sync]",
        f'interval = "{args.interval}"',
        "page_size = 100",
        "max_concurrent_pages = 4",
        "max_retries = 3",
        'backoff_base = "100ms"',
        'backoff_max = "2s"',
        'request_timeout = "3s"',
        'async_action_timeout = "10s"',
        "",
        "[daemon]",
        'listen = "127.0.0.1:0"',
        "max_concurrent_tenants = 8",
        'startup_spread = "5s"',
        'shutdown_grace = "5s"',
    ]
    for number, tenant in enumerate(simulator.tenants):
        lines += ["", "[[tenants]]", f'name = "{tenant["name"]}"', f'url = "{simulator.url}"']
        if number % PASSWORD_TENANT_EVERY == PASSWORD_TENANT_EVERY - 1:
            lines += [f'username = "{tenant["username"]}"', f'password = "{tenant["password"]}"']
        else:
            lines.append(f'api_key = "{tenant["api_key"]}"')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)


def syncd_command(config_path: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "syncd.cli",
        "--log-format",
        "json",
        "--config",
        str(config_path),
        *args,
    ]


async def run_to_end(*command: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def sample(
    connection: asyncpg.Connection, database: str, daemon: psutil.Process
) -> dict[str, Any]:
    connections = await connection.fetch(
        "SELECT coalesce(state, '?') AS state, count(*) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid() GROUP BY 1",
        database,
    )
    runs = await connection.fetch("SELECT status, count(*) FROM syncd.runs GROUP BY 1")
    return {
        "rss_mb": daemon.memory_info().rss / 2**20,
        "pg_connections": {row["state"]: row["count"] for row in connections},
        "runs": {row["status"]: row["count"] for row in runs},
    }


HISTORY_PROBLEMS = """
SELECT 'overlapping or duplicate interval' AS problem, count(*) FROM (
    SELECT valid_from, lag(valid_to) OVER w AS previous_to, row_number() OVER w AS position
      FROM syncd.links
    WINDOW w AS (PARTITION BY tenant_id, job_uid, unique_job_uid, linked_job_uid
                 ORDER BY valid_from, id)) x
 WHERE position > 1 AND (previous_to IS NULL OR previous_to > valid_from)
UNION ALL
SELECT 'current_pairs differs from open intervals', count(*) FROM syncd.tenants t
 WHERE t.current_pairs <> (SELECT count(*) FROM syncd.links l
                            WHERE l.tenant_id = t.id AND l.valid_to IS NULL)
UNION ALL
SELECT 'link opened by a failed run', count(*) FROM syncd.links l
  JOIN syncd.runs r ON r.id = l.opened_run_id WHERE r.status NOT IN ('succeeded', 'partial')
UNION ALL
SELECT 'link closed by a run that was not succeeded', count(*) FROM syncd.links l
  JOIN syncd.runs r ON r.id = l.closed_run_id WHERE r.status <> 'succeeded'
UNION ALL
SELECT 'run left running', count(*) FROM syncd.runs WHERE status = 'running'
"""


async def soak(args: argparse.Namespace) -> int:
    server_url = args.server_url.rstrip("/")
    database = f"syncd_soak_{os.getpid()}"
    database_url = f"{server_url}/{database}"
    admin = await asyncpg.connect(f"{server_url}/postgres")
    await admin.execute(f"CREATE DATABASE {database}")
    failures: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="syncd-soak-"))
    simulator = await Simulator.start(args)
    daemon_process: asyncio.subprocess.Process | None = None
    try:
        config_path = workdir / "syncd.toml"
        write_config(config_path, database_url, simulator, args)
        code, _, stderr = await run_to_end(*syncd_command(config_path, "migrate"))
        if code != 0:
            raise SystemExit(f"syncd migrate failed:\n{stderr}")

        stderr_path = workdir / "daemon.log"
        with stderr_path.open("wb") as log_file:
            daemon_process = await asyncio.create_subprocess_exec(
                *syncd_command(config_path, "run"), stdout=log_file, stderr=log_file
            )
        daemon = psutil.Process(daemon_process.pid)
        probe = await asyncpg.connect(database_url)
        started = time.monotonic()
        deadline = started + args.minutes * 60
        next_churn = started + args.churn_every_s
        samples: list[dict[str, Any]] = []
        print(
            f"soak: {args.tenants} tenants x {args.pairs} pairs, interval {args.interval}, "
            f"{args.fault_rate:.0%} faulty requests, {args.minutes:g} min; logs: {stderr_path}"
        )
        print(f"{'t_s':>6} {'rss_mb':>7} {'pg_conns':>9}  runs by status")
        while time.monotonic() < deadline:
            await asyncio.sleep(min(args.sample_s, max(0.0, deadline - time.monotonic())))
            if daemon_process.returncode is not None:
                failures.append(f"syncd run exited early with {daemon_process.returncode}")
                break
            if time.monotonic() >= next_churn:
                await simulator.command(f"churn {args.churn_fraction}")
                next_churn += args.churn_every_s
            figures = await sample(probe, database, daemon)
            figures["t_s"] = time.monotonic() - started
            samples.append(figures)
            print(
                f"{figures['t_s']:6.0f} {figures['rss_mb']:7.1f} "
                f"{sum(figures['pg_connections'].values()):9d}  {figures['runs']}",
                flush=True,
            )

        cleared = await simulator.command("clear")
        stats = await simulator.command("stats")
        daemon_process.send_signal(signal.SIGTERM)
        stop_started = time.monotonic()
        exit_code = await asyncio.wait_for(daemon_process.wait(), 60)
        stop_s = time.monotonic() - stop_started
        if exit_code != 0:
            failures.append(f"syncd run exited with {exit_code} after SIGTERM")
        log_text = stderr_path.read_text(errors="replace")
        levels: collections.Counter[str] = collections.Counter()
        for line in log_text.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    levels[str(record.get("level"))] += 1
        if "Traceback" in log_text:
            failures.append("a traceback in the daemon's log")
        left_running = await probe.fetchval(
            "SELECT count(*) FROM syncd.runs WHERE status = 'running'"
        )
        if left_running:
            failures.append(f"{left_running} run(s) left running after SIGTERM")

        final_code, final_out, final_err = await run_to_end(*syncd_command(config_path, "sync"))
        if final_code != 0:
            failures.append(
                f"final clean syncd sync exited {final_code}:\n{final_out}{final_err[-2000:]}"
            )
        dump_path = workdir / "expected.json"
        await simulator.command(f"dump {dump_path}")
        expected: dict[str, list[list[str | None]]] = orjson.loads(dump_path.read_bytes())
        exact = 0
        for tenant, pairs in expected.items():
            rows = await probe.fetch(
                "SELECT job_uid::text, unique_job_uid::text, linked_job_uid::text "
                "FROM syncd.job_links_current WHERE tenant = $1",
                tenant,
            )
            stored = {(r[0], r[1], r[2]) for r in rows}
            wanted = {(p[0], p[1], p[2]) for p in pairs}
            if stored == wanted:
                exact += 1
            else:
                failures.append(
                    f"{tenant}: copy differs ({len(stored - wanted)} extra, "
                    f"{len(wanted - stored)} missing)"
                )
        for problem, count in await probe.fetch(HISTORY_PROBLEMS):
            if count:
                failures.append(f"history: {problem}: {count}")
        runs = await probe.fetch("SELECT status, count(*) FROM syncd.runs GROUP BY 1 ORDER BY 1")
        errors = await probe.fetch(
            "SELECT left(regexp_replace(error, '[0-9a-f-]{36}|[0-9]+', '#', 'g'), 90) AS kind, "
            "count(*) FROM syncd.runs WHERE error IS NOT NULL GROUP BY 1 ORDER BY 2 DESC "
            "LIMIT 12"
        )
        await probe.close()

        connections = [sum(s["pg_connections"].values()) for s in samples] or [0]
        print("\n=== soak summary ===")
        print(f"duration: {args.minutes:g} min, samples: {len(samples)}")
        if samples:
            print(
                f"daemon RSS: start {samples[0]['rss_mb']:.1f} MB, "
                f"end {samples[-1]['rss_mb']:.1f} MB, "
                f"max {max(s['rss_mb'] for s in samples):.1f} MB"
            )
        print(
            f"PostgreSQL connections of syncd: min {min(connections)}, max {max(connections)}, "
            f"last {connections[-1]}"
        )
        print(f"simulator: requests by status {stats['requests_by_status']}")
        print(
            f"simulator: faults fired {cleared['faults_fired']}, "
            f"token grants {stats['token_grants']}"
        )
        print("runs by status (daemon + final sync): " + ", ".join(f"{r[0]}={r[1]}" for r in runs))
        print("most common run errors:")
        for kind, count in errors:
            print(f"  {count:5d}  {kind}")
        print(f"daemon log lines by level: {dict(levels)}; stopped {stop_s:.1f}s after SIGTERM")
        print(f"runs left running after SIGTERM: {left_running}")
        print(f"final clean sync: exit {final_code}; exact copies: {exact}/{len(expected)}")
        for failure in failures:
            print(f"FAIL: {failure}")
        print("PASS" if not failures else f"{len(failures)} check(s) failed")
        return 0 if not failures else 1
    finally:
        if daemon_process is not None and daemon_process.returncode is None:
            daemon_process.kill()
            await daemon_process.wait()
        await simulator.stop()
        if not args.keep:
            await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        await admin.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("mode", nargs="?", default="soak", choices=["soak", "simulator"])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=2000, help="pairs per tenant")
    parser.add_argument("--interval", default="20s", help="each tenant's sync interval")
    parser.add_argument("--fault-rate", type=float, default=0.05)
    parser.add_argument("--churn-every-s", type=float, default=60.0)
    parser.add_argument("--churn-fraction", type=float, default=0.01)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--server-url",
        default=os.environ.get("SYNCD_SOAK_SERVER_URL", "postgresql://postgres@127.0.0.1:5432"),
        help="PostgreSQL server (no database part) to create the soak database on",
    )
    parser.add_argument("--keep", action="store_true", help="keep the soak database")
    args = parser.parse_args(argv)
    if args.mode == "simulator":
        asyncio.run(serve_simulator(args))
        return 0
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
