"""Status page cost at scale: `python -m benchmarks.status_page [--tenants T] [--days D]`.

Creates `syncd_bench_<pid>` on `$SYNCD_BENCH_DATABASE_URL`'s server, migrates it, and
fills `syncd.runs` with `--days` of history for `--tenants` tenants, one run per tenant every
`--interval-minutes`, inserted in time order as a daemon would (ids grow with time). Then it
measures what one page view costs: the two history queries (`history.read_history`) and the
rendering (`page.render`) of every tenant's row (the first view, then `--repeat` more: median
and worst), prints both queries' plans with buffer counts and the page's size, and drops the
database.

The defaults are the issue's case: 1,000 tenants, a year of runs every 15 minutes
(35 million runs). Filling that takes minutes and about 8 GB of disk; `--days 30` is quick.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import sqlalchemy as sa

from benchmarks.sync import DATABASE_URL_ENV, DEFAULT_DATABASE_URL, bench_database
from syncd import db, history, page, svg

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


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--interval-minutes", type=float, default=15.0)
    parser.add_argument("--repeat", type=int, default=20)
    return parser.parse_args()


def milliseconds(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1000:.1f} ms, worst {max(samples) * 1000:.1f} ms"


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
        await connection.execute("VACUUM ANALYZE syncd.runs")
        await connection.execute("VACUUM ANALYZE syncd.tenants")
        count: int = await connection.fetchval("SELECT count(*) FROM syncd.runs")
        return count
    finally:
        await connection.close()


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


async def explain(engine: Any, names: list[str], now: datetime) -> None:
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
                {"tenants": names, "limit": history.RECENT_RUNS},
            ),
        ):
            plan = await connection.execute(
                sa.text("EXPLAIN (ANALYZE, BUFFERS) " + query.text), params
            )
            print(f"\n--- plan: {title}")
            print("\n".join(row[0] for row in plan))


async def main() -> None:
    args = arguments()
    server = os.environ.get(DATABASE_URL_ENV, DEFAULT_DATABASE_URL)
    async with bench_database(server) as url, db.open_engine(url, pool_size=2) as engine:
        runs = await fill(url, args.tenants, args.days, args.interval_minutes)
        names = [f"tenant-{i:04d}" for i in range(1, args.tenants + 1)]
        now = datetime.now(UTC)
        await history.read_history(engine, names, now=now)  # warm the cache and the pool
        reads, renders = [], []
        found = None
        for _ in range(args.repeat):
            started = time.perf_counter()
            found = await history.read_history(engine, names, now=now)
            reads.append(time.perf_counter() - started)
        assert found is not None
        data = page.PageData(
            checks={"database": None, "schema": None, "scheduler": None},
            tenants=rows_for(names, now),
            now=now,
            history=found,
        )
        # The first view draws every strip; later ones find most of them remembered.
        svg.strip.cache_clear()
        svg.change_strip.cache_clear()
        started = time.perf_counter()
        document = page.render(data)
        first_render = time.perf_counter() - started
        for _ in range(args.repeat):
            started = time.perf_counter()
            document = page.render(data)
            renders.append(time.perf_counter() - started)
        await explain(engine, names, now)
        size = len(document.encode())
        print(
            f"\n{args.tenants} tenants, {runs:,} runs over {args.days} days\n"
            f"history queries: {milliseconds(reads)}\n"
            f"page rendering:  first view {first_render * 1000:.1f} ms; "
            f"then {milliseconds(renders)}\n"
            f"page size:       {size / 1e6:.2f} MB, "
            f"{len(gzip.compress(document.encode())) / 1e3:.0f} kB compressed"
        )


if __name__ == "__main__":
    asyncio.run(main())
