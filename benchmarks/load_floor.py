"""PostgreSQL's floor for an initial load, written without syncd:
`python -m benchmarks.load_floor --database-url URL`.

The limit (`benchmarks.limit`) copies pairs into an UNLOGGED table without indexes. An
exact, durable copy with history cannot do that: every pair becomes a logged row of a table
with the indexes its queries need. This measures what PostgreSQL alone takes for that, with
no fetching and no syncd code (it imports asyncpg and the standard library only; a test
checks): each session first fills a temporary table with `--pairs-per-tenant` random pairs
in the pairs' order (not timed), then, timed, inserts them once per tenant into a scratch
table created `LIKE syncd.links INCLUDING ALL` (so the URL's database must be migrated by
syncd), one transaction per tenant with `synchronous_commit = off`, `--sessions` at once.
Prints one JSON object per session count: rows, seconds, rows_per_s, pg_cpu_s (the server's
backends, when it runs on this machine and is readable, else null).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

TABLE = f"public.load_floor_{os.getpid()}"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _postmaster_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if command and command[0].endswith(b"postgres") and stat[1] == "1":
            return int(entry.name)
    return None


def server_cpu_s() -> float | None:
    """User+system CPU of the postmaster's children, live and exited; None if unreadable."""
    postmaster = _postmaster_pid()
    if postmaster is None:
        return None
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if entry.name == str(postmaster):
            ticks += int(stat[13]) + int(stat[14])  # children already reaped
        elif int(stat[1]) == postmaster:
            ticks += int(stat[11]) + int(stat[12])
    return ticks / _CLOCK_TICKS


async def measure(
    url: str, *, tenants: int, pairs_per_tenant: int, sessions: int
) -> dict[str, Any]:
    """One load of `tenants` x `pairs_per_tenant` rows by `sessions` sessions at once."""
    admin = await asyncpg.connect(url)
    connections: list[asyncpg.Connection] = []
    try:
        await admin.execute(
            f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (LIKE syncd.links INCLUDING ALL)"
        )
        for _ in range(sessions):
            connection = await asyncpg.connect(url)
            connections.append(connection)
            await connection.execute(
                "CREATE TEMPORARY TABLE pairs AS SELECT gen_random_uuid() AS job_uid, "
                "'00000000-0000-0000-0000-000000000000'::uuid AS unique_job_uid, "
                f"gen_random_uuid() AS linked_job_uid FROM generate_series(1, {pairs_per_tenant}) "
                "ORDER BY 1, 3"
            )
        await admin.execute("CHECKPOINT")
        pending = list(range(1, tenants + 1))

        async def work(connection: asyncpg.Connection) -> None:
            while pending:
                tenant_id = pending.pop()
                async with connection.transaction():
                    await connection.execute("SET LOCAL synchronous_commit = off")
                    await connection.execute(
                        f"INSERT INTO {TABLE} (tenant_id, copy_mode, job_uid, linked_job_uid, "
                        "unique_job_uid, valid_from, opened_run_id) "
                        "SELECT $1, 'periodic', job_uid, linked_job_uid, unique_job_uid, now(), 1 "
                        "FROM pairs ORDER BY job_uid, linked_job_uid, unique_job_uid",
                        tenant_id,
                    )

        cpu_before = server_cpu_s()
        started = time.perf_counter()
        await asyncio.gather(*(work(connection) for connection in connections))
        seconds = time.perf_counter() - started
        cpu_after = server_cpu_s()
        rows = await admin.fetchval(f"SELECT count(*) FROM {TABLE}")
    finally:
        for connection in connections:
            await connection.close()
        await admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await admin.close()
    return {
        "sessions": sessions,
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds if seconds else None,
        "pg_cpu_s": None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one JSON line per session count."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load_floor", description=__doc__)
    parser.add_argument("--database-url", required=True, help="a database migrated by syncd")
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--pairs-per-tenant", type=int, default=10_000)
    parser.add_argument("--sessions", default="1,2,8", help="session counts, comma-separated")
    args = parser.parse_args(argv)
    for sessions in (int(part) for part in args.sessions.split(",")):
        figures = asyncio.run(
            measure(
                args.database_url,
                tenants=args.tenants,
                pairs_per_tenant=args.pairs_per_tenant,
                sessions=sessions,
            )
        )
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
