"""Status page cost at scale: `python -m benchmarks.status_page [--tenants T] [--days D]`.

Creates `syncd_bench_<pid>` on `$SYNCD_BENCH_DATABASE_URL`'s server, migrates it, and
fills `syncd.runs` with `--days` of history for `--tenants` tenants, one run per tenant every
`--interval-minutes`, inserted in time order as a daemon would (ids grow with time), the
latest run of every 20th tenant still running; then it rebuilds the hourly rollup from them
(`store.rebuild_run_hours`: what the migration's backfill costs at that size). Then it
measures what one page view costs: the history queries (`history.read_history`, the last
runs of the detailed tenants alone) and the rendering (`page.render`, through a secret
scrubber that knows every tenant's API key, as the daemon's does) (the first view, then
`--repeat` more: median and worst), prints the queries' plans with buffer counts and the
page's size, and drops the database.

The defaults are the issue's case: 1,000 tenants, a year of runs every 15 minutes
(35 million runs). Filling that takes minutes and about 8 GB of disk; `--days 30` is quick.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import re
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import sqlalchemy as sa

from benchmarks.sync import DATABASE_URL_ENV, DEFAULT_DATABASE_URL, bench_database
from syncd import db, history, logs, page, store, svg

FILL_RUNS = """
INSERT INTO syncd.runs (tenant_id, started_at, finished_at, status, pages_fetched,
                        pairs_seen, pairs_added, pairs_removed, error)
SELECT t.id, s.at, s.at + make_interval(secs => 0.5 + random() * 6),
       CASE WHEN random() < 0.02 THEN 'failed' WHEN random() < 0.03 THEN 'partial'
            ELSE 'succeeded' END,
       20, 10000, (random() * 3)::int, (random() * 2)::int, NULL
  FROM generate_series($1::timestamptz, $2::timestamptz - interval '1 microsecond', $3::interval)
       AS s(at)
 CROSS JOIN syncd.tenants t
 ORDER BY s.at, t.id
"""


NAMES = re.compile(r"'\{([^}]*)\}'::text\[\]")


def _names_counted(match: re.Match[str]) -> str:
    return f"'{{{len(match[1].split(','))} names}}'::text[]"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--interval-minutes", type=float, default=15.0)
    parser.add_argument("--repeat", type=int, default=20)
    return parser.parse_args()


def milliseconds(samples: list[float]) -> str:
    # The best of them too: on a shared machine it is the one least disturbed by others.
    return (
        f"median {statistics.median(samples) * 1000:.1f} ms, best {min(samples) * 1000:.1f} ms, "
        f"worst {max(samples) * 1000:.1f} ms"
    )


async def fill(url: str, tenants: int, days: int, interval_minutes: float) -> int:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("SET synchronous_commit = off")
        await connection.execute(
            "INSERT INTO syncd.tenants (name, current_pairs) "
            "SELECT 'tenant-' || lpad(i::text, 4, '0'), 10000 FROM generate_series(1, $1) i",
            tenants,
        )
        step = timedelta(minutes=interval_minutes)
        end = datetime.now(UTC)
        day = end - timedelta(days=days)
        started = time.monotonic()
        while day < end:
            until = min(day + timedelta(days=1), end)
            await connection.execute(FILL_RUNS, day, until, step)
            day = until
            done = 1 - (end - day) / timedelta(days=days)
            print(f"\rfilling runs: {done:6.1%}  {time.monotonic() - started:6.0f} s", end="")
        print()
        # A few tenants are always mid-run.
        await connection.execute(
            "UPDATE syncd.runs SET status = 'running', finished_at = NULL "
            "WHERE id IN (SELECT max(id) FROM syncd.runs WHERE tenant_id % 20 = 0 "
            "GROUP BY tenant_id)"
        )
        await connection.execute("VACUUM ANALYZE syncd.runs")
        await connection.execute("VACUUM ANALYZE syncd.tenants")
        count: int = await connection.fetchval("SELECT count(*) FROM syncd.runs")
        return count
    finally:
        await connection.close()


async def roll_up(engine: Any) -> float:
    """Seconds to rebuild the hourly rollup from every run (the migration's backfill)."""
    started = time.monotonic()
    async with engine.begin() as connection:
        await store.rebuild_run_hours(connection)
    elapsed = time.monotonic() - started
    async with engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(sa.text("VACUUM ANALYZE syncd.run_hours"))
    return elapsed


def rows_for(names: list[str], now: datetime) -> list[dict[str, Any]]:
    """Scheduler status rows as the daemon would show them."""
    return [
        {
            "tenant": name,
            "schedule": "every 900s",
            "period_s": 900.0,
            "running": False,
            "queued": False,
            "waiting_for": None,
            "last_status": "succeeded",
            "last_error": None,
            "last_success_at": (now - timedelta(minutes=7)).isoformat(),
            "pairs": 10000,
            "next_run_at": (now + timedelta(minutes=8)).isoformat(),
            "consecutive_failures": 0,
        }
        for name in names
    ]


async def explain(engine: Any, names: list[str], detailed: list[str], now: datetime) -> None:
    async with engine.connect() as connection:
        for title, query, params in (
            (
                "last 24 hours",
                history._LAST_DAY,
                {"since": history.window_start(now), "tenants": names},
            ),
            (
                "last runs per tenant",
                history._RECENT,
                {"tenants": detailed, "limit": history.RECENT_RUNS},
            ),
        ):
            plan = await connection.execute(
                sa.text("EXPLAIN (ANALYZE, BUFFERS) " + query.text), params
            )
            print(f"\n--- plan: {title}")
            # A thousand tenant names would fill the screen: their count is enough.
            print("\n".join(NAMES.sub(_names_counted, row[0]) for row in plan))


async def machine_reference(engine: Any, repeat: int = 5) -> list[float]:
    """Seconds PostgreSQL takes to count a million generated rows, `repeat` times."""
    samples = []
    async with engine.connect() as connection:
        for _ in range(repeat):
            started = time.perf_counter()
            await connection.execute(sa.text("SELECT count(*) FROM generate_series(1, 1000000)"))
            samples.append(time.perf_counter() - started)
    return samples


def scrubber(tenants: int) -> logs.SecretScrubber:
    """The daemon's scrubber: it knows every tenant's API key."""
    known = logs.SecretScrubber()
    known.register(f"{index:08x}-6a1e-4c2b-9d7e-{index * 7919:012x}" for index in range(tenants))
    return known


async def main() -> None:
    args = arguments()
    server = os.environ.get(DATABASE_URL_ENV, DEFAULT_DATABASE_URL)
    async with bench_database(server) as url, db.open_engine(url, pool_size=2) as engine:
        runs = await fill(url, args.tenants, args.days, args.interval_minutes)
        rollup_s = await roll_up(engine)
        names = [f"tenant-{i:04d}" for i in range(1, args.tenants + 1)]
        now = datetime.now(UTC)
        rows = rows_for(names, now)
        detailed = page.detailed(rows, now)
        await history.read_history(engine, names, recent_of=detailed, now=now)  # warm up
        reads, renders = [], []
        found = None
        for _ in range(args.repeat):
            started = time.perf_counter()
            found = await history.read_history(engine, names, recent_of=detailed, now=now)
            reads.append(time.perf_counter() - started)
        assert found is not None
        data = page.PageData(
            checks={"database": None, "schema": None, "scheduler": None},
            tenants=rows,
            now=now,
            history=found,
        )
        scrub = scrubber(args.tenants).scrub
        # The first view draws every strip; later ones find most of them remembered.
        svg.strip.cache_clear()
        svg.change_strip.cache_clear()
        started = time.perf_counter()
        document = page.render(data, scrub=scrub)
        first_render = time.perf_counter() - started
        for _ in range(args.repeat):
            started = time.perf_counter()
            document = page.render(data, scrub=scrub)
            renders.append(time.perf_counter() - started)
        await explain(engine, names, detailed, now)
        size = len(document.encode())
        reference = await machine_reference(engine)
        print(
            f"\n{args.tenants} tenants, {runs:,} runs over {args.days} days\n"
            f"rollup rebuilt:  {rollup_s:.1f} s (the migration's backfill at this size)\n"
            f"history queries: {milliseconds(reads)}\n"
            f"page rendering:  first view {first_render * 1000:.1f} ms; "
            f"then {milliseconds(renders)}\n"
            f"page size:       {size / 1e6:.2f} MB, "
            f"{len(gzip.compress(document.encode())) / 1e3:.0f} kB compressed\n"
            f"machine:         PostgreSQL counts 1M rows in {milliseconds(reference)} "
            "(to compare runs on machines under other loads)"
        )


if __name__ == "__main__":
    asyncio.run(main())
