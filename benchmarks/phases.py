"""One measured phase of the benchmark, in a fresh process (`python -m benchmarks.phases`).

A fresh process per phase makes `ru_maxrss` (a process's high-water mark, which never goes
down) that phase's own peak, and its CPU time that phase's own. The phase's spec arrives as
one JSON object on stdin; the figures leave as one JSON object on stdout.

Phases:
- `parse`: fetch every page's raw body with plain aiohttp (no checks), then run
  `paging.parse_page` over the bodies: the client's parse-and-check CPU, alone.
- `fetch`: syncd's own client (`vspc.open_client` / `fetch_snapshot`) reads every tenant with
  the configured concurrency and discards the pairs: syncd's fetch-only cost, compared with
  `benchmarks.limit`'s plain aiohttp fetch of the same pages.
- `fetch_copy`: the same, plus binary COPY of every pair into an UNLOGGED table without
  indexes: what syncd's client adds to the independent limit (`benchmarks.limit`); built
  from syncd's code, so not itself a limit.
- `sync`: `sync.sync_tenants` / `sync_tenant`, the real path (initial, no-op or churn re-sync)
  without the `syncd sync` process around it: for profiles; the headline figures time the
  whole process.

Around the phase, a probe connection reads PostgreSQL's WAL position, the tables' write
counters and the CPU time of the server's processes (see `PgProbe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
import psutil  # type: ignore[import-untyped]

from syncd import config, db, logs, paging, schema, simulator, store, sync, vspc

COPY_TABLE = "bench_copy"
SYNCD_TABLES = ("links", "catalog_items", "runs", "tenants")
OTHERS_GONE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PhaseSpec:
    """What to run, against which simulator and database."""

    phase: str
    database_url: str  # plain postgresql:// form
    simulator_url: str
    simulator_pid: int
    tenants: list[tuple[str, str]]  # (name, api key)
    page_size: int
    max_concurrent_pages: int
    max_concurrent_tenants: int
    collections: list[str] | None = None  # [sync] collections; None: the default (all)

    def syncd_config(self) -> config.Config:
        """The configuration `syncd sync` would load for this benchmark."""
        return config.validate_config(self.config_data(), environ={})

    def config_data(self) -> dict[str, Any]:
        """That configuration as the TOML file's data."""
        sync: dict[str, Any] = {
            "page_size": self.page_size,
            "max_concurrent_pages": self.max_concurrent_pages,
        }
        if self.collections is not None:
            sync["collections"] = self.collections
        return {
            "database": {"url": self.database_url},
            "sync": sync,
            "daemon": {"max_concurrent_tenants": self.max_concurrent_tenants},
            "tenants": [
                {"name": name, "url": self.simulator_url, "api_key": key}
                for name, key in self.tenants
            ],
        }


class PgProbe:
    """Reads the server-side figures of a phase on a connection of its own.

    PostgreSQL CPU is the sum of user+system time of the postmaster's children: the live
    ones (psutil) plus those already exited, which the kernel adds to the postmaster's
    `cutime`/`cstime` when it reaps them. Deltas of that sum cover every backend that ran
    during the phase (and the background writer, WAL writer and checkpointer). It needs the
    server on this machine, readable by this user; otherwise it is None.
    """

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self.postmaster: psutil.Process | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, database_url: str) -> AsyncIterator[PgProbe]:
        """A probe connected to `database_url`, closed on exit."""
        connection = await asyncpg.connect(
            database_url, server_settings={"application_name": "syncd-bench-probe"}
        )
        try:
            probe = cls(connection)
            backend_pid = await connection.fetchval("SELECT pg_backend_pid()")
            with contextlib.suppress(psutil.Error):
                backend = psutil.Process(backend_pid)
                if "postgres" in backend.name():
                    probe.postmaster = psutil.Process(backend.ppid())
            yield probe
        finally:
            await connection.close()

    def pg_cpu_s(self) -> float | None:
        """CPU seconds used so far by the server's processes (see the class docstring)."""
        if self.postmaster is None:
            return None
        try:
            own = self.postmaster.cpu_times()
            total = own.user + own.system + own.children_user + own.children_system
            for child in self.postmaster.children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = child.cpu_times()
                    total += times.user + times.system
        except psutil.Error:
            return None
        return float(total)

    async def wait_for_others(self) -> None:
        """Waits until no other session uses this database: their statistics are flushed
        (a backend reports them when it exits) and their CPU is in the postmaster's."""
        deadline = time.monotonic() + OTHERS_GONE_TIMEOUT_S
        while time.monotonic() < deadline:
            others = await self.connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            if not others:
                return
            await asyncio.sleep(0.01)
        raise RuntimeError("sessions of the phase are still connected")

    async def snapshot(self, *, settled: bool) -> dict[str, Any]:
        """WAL position, write counters of syncd's tables and server CPU, right now; with
        `settled`, first waits for every other session to end."""
        if settled:
            await self.wait_for_others()
        await self.connection.execute("SELECT pg_stat_clear_snapshot()")
        rows = await self.connection.fetch(
            "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del AS written "
            "FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = any($2::text[])",
            schema.SCHEMA,
            list(SYNCD_TABLES),
        )
        written = dict.fromkeys(SYNCD_TABLES, 0)
        written.update({row["relname"]: int(row["written"]) for row in rows})
        lsn = await self.connection.fetchval("SELECT pg_current_wal_lsn()")
        return {"lsn": lsn, "written": written, "pg_cpu_s": self.pg_cpu_s()}

    async def wal_bytes_between(self, before: str, after: str) -> int:
        """Bytes of WAL between two LSNs."""
        return int(await self.connection.fetchval("SELECT pg_wal_lsn_diff($1, $2)", after, before))


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _other_cpu_s(pid: int) -> float | None:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


async def _fetch_all(
    spec: PhaseSpec, cfg: config.Config, copy_pool: asyncpg.Pool | None
) -> dict[str, Any]:
    """Reads every tenant with syncd's client; COPYs the pairs when given a pool."""
    limit = asyncio.Semaphore(spec.max_concurrent_tenants)

    async def one(tenant: config.Tenant) -> tuple[int, bool]:
        buffer: list[paging.PairBlock] = []

        async def copy(connection: asyncpg.Connection) -> None:
            data = store.pair_copy_data(buffer)

            async def source() -> AsyncIterator[bytes]:
                yield data

            await connection.copy_to_table(
                COPY_TABLE,
                source=source(),
                columns=("job_uid", "unique_job_uid", "linked_job_uid"),
                format="binary",
            )
            buffer.clear()

        async with limit, contextlib.AsyncExitStack() as stack:
            connection = None
            if copy_pool is not None:
                connection = await stack.enter_async_context(copy_pool.acquire())

            async def on_page(page: paging.Page) -> None:
                if connection is not None:
                    buffer.append(page.block)
                    if sum(block.count for block in buffer) >= 20_000:
                        await copy(connection)

            client = await stack.enter_async_context(vspc.open_client(tenant))
            outcome = await client.fetch_snapshot(on_page)
            if connection is not None and buffer:
                await copy(connection)
            return outcome.total or 0, outcome.complete

    outcomes = await asyncio.gather(*(one(tenant) for tenant in cfg.tenants))
    return {
        "pairs": sum(total for total, _ in outcomes),
        "complete": all(complete for _, complete in outcomes),
    }


async def _parse_only(spec: PhaseSpec) -> dict[str, Any]:
    """Raw bodies with plain aiohttp, then `paging.parse_page` over them (CPU seconds)."""
    endpoint = spec.simulator_url + simulator.JOB_OBJECTS_PATH
    bodies: list[tuple[str, int, int | None, bytes]] = []
    limit = asyncio.Semaphore(spec.max_concurrent_tenants)
    fetch_started = time.perf_counter()

    async def one(session: aiohttp.ClientSession, name: str, key: str) -> None:
        headers = {"Authorization": f"Bearer {key}", "X-Client-Version": "3.6"}

        async def get(offset: int) -> bytes:
            params = {"limit": str(spec.page_size), "offset": str(offset)}
            params["sort"] = paging.SORT_PARAM
            async with session.get(endpoint, params=params, headers=headers) as response:
                return await response.read()

        async with limit:
            first = await get(0)
            total = orjson.loads(first)["meta"]["pagingInfo"]["total"]
            bodies.append((name, 0, None, first))
            offsets = paging.plan_offsets(total, spec.page_size)
            pages = asyncio.Semaphore(spec.max_concurrent_pages)

            async def page(offset: int) -> None:
                async with pages:
                    bodies.append((name, offset, total, await get(offset)))

            await asyncio.gather(*(page(offset) for offset in offsets))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, name, key) for name, key in spec.tenants))
    fetch_s = time.perf_counter() - fetch_started

    parse_started = time.process_time()
    items = 0
    for name, offset, total, body in bodies:
        page = paging.parse_page(
            body, tenant=name, offset=offset, limit=spec.page_size, expected_total=total
        )
        items += page.count
    parse_cpu_s = time.process_time() - parse_started
    return {
        "pairs": sum(
            orjson.loads(body)["meta"]["pagingInfo"]["total"] for _, o, _, body in bodies if o == 0
        ),
        "items_parsed": items,
        "raw_fetch_s": fetch_s,
        "parse_cpu_s": parse_cpu_s,
        "complete": True,
    }


async def _sync(cfg: config.Config) -> dict[str, Any]:
    # As `syncd sync` opens and runs them.
    async with db.open_configured_engine(cfg, None, synchronous_commit=False) as engine:
        results = await sync.sync_tenants(
            cfg.tenants,
            engine,
            max_concurrent_tenants=cfg.daemon.max_concurrent_tenants,
            max_concurrent_applies=cfg.database.max_concurrent_applies,
        )
    statuses: dict[str, int] = {}
    for result in results:
        statuses[str(result.status)] = statuses.get(str(result.status), 0) + 1
    return {
        "pairs": sum(result.pairs_seen for result in results),
        "added": sum(result.added for result in results),
        "removed": sum(result.removed for result in results),
        "statuses": statuses,
        "errors": sorted({result.error for result in results if result.error}),
        "complete": statuses.get("succeeded", 0) == len(results),
    }


async def run_phase(spec: PhaseSpec) -> dict[str, Any]:
    """Runs `spec.phase` once and measures it."""
    cfg = spec.syncd_config()
    async with PgProbe.open(spec.database_url) as probe:
        copy_pool: asyncpg.Pool | None = None
        if spec.phase == "fetch_copy":
            await probe.connection.execute(
                f"DROP TABLE IF EXISTS {COPY_TABLE}; CREATE UNLOGGED TABLE {COPY_TABLE} "
                "(job_uid uuid NOT NULL, unique_job_uid uuid NOT NULL, "
                "linked_job_uid uuid NOT NULL)"
            )
            copy_pool = await asyncpg.create_pool(
                spec.database_url,
                min_size=spec.max_concurrent_tenants,
                max_size=spec.max_concurrent_tenants,
            )
        baseline_rss_mb = psutil.Process().memory_info().rss / 2**20
        before = await probe.snapshot(settled=False)
        simulator_before = _other_cpu_s(spec.simulator_pid)
        cpu_before = _process_cpu_s()
        started = time.perf_counter()
        if spec.phase == "sync":
            figures = await _sync(cfg)
        elif spec.phase == "parse":
            figures = await _parse_only(spec)
        elif spec.phase in ("fetch", "fetch_copy"):
            figures = await _fetch_all(spec, cfg, copy_pool)
        else:
            raise ValueError(f"unknown phase {spec.phase!r}")
        seconds = time.perf_counter() - started
        syncd_cpu_s = _process_cpu_s() - cpu_before
        simulator_after = _other_cpu_s(spec.simulator_pid)
        peak_rss_mb = _peak_rss_mb()
        if copy_pool is not None:
            # Closed before the server-side snapshot so its backends' CPU is counted.
            copy_rows = await probe.connection.fetchval(f"SELECT count(*) FROM {COPY_TABLE}")
            await copy_pool.close()
            figures["copied"] = int(copy_rows)
        after = await probe.snapshot(settled=True)
        if copy_pool is not None:
            await probe.connection.execute(f"DROP TABLE {COPY_TABLE}")
        pg_cpu_s = None
        if before["pg_cpu_s"] is not None and after["pg_cpu_s"] is not None:
            pg_cpu_s = after["pg_cpu_s"] - before["pg_cpu_s"]
        written = {
            table: after["written"][table] - before["written"][table] for table in SYNCD_TABLES
        }
        return {
            **figures,
            "seconds": seconds,
            "syncd_cpu_s": syncd_cpu_s,
            "pg_cpu_s": pg_cpu_s,
            "simulator_cpu_s": (
                None
                if simulator_before is None or simulator_after is None
                else simulator_after - simulator_before
            ),
            "baseline_rss_mb": baseline_rss_mb,
            "peak_rss_mb": peak_rss_mb,
            "rows_written": written,
            "wal_bytes": await probe.wal_bytes_between(before["lsn"], after["lsn"]),
        }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the spec as JSON on stdin, the figures as JSON on stdout."""
    del argv
    logs.configure(level="warning", log_format="json")
    spec = PhaseSpec(**orjson.loads(sys.stdin.buffer.read()))
    figures = asyncio.run(run_phase(spec))
    sys.stdout.write(orjson.dumps(figures).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
