"""The fetch+copy limit, written without syncd: `python -m benchmarks.limit SPEC.json`.

What the least a sync could do costs on this machine, measured with none of syncd's code (it
imports aiohttp, orjson, asyncpg and the standard library only; a test checks), so that the
limit does not move with syncd's own overhead. Per tenant: GET the first page to learn the
total, then the remaining pages, at most `pages_per_tenant` of one tenant and
`pages_in_flight` in all in flight. With `copy`, every pair goes, as its page arrives, into
ONE binary COPY (asyncpg `copy_records_to_table` fed by an async generator) into an UNLOGGED
table without indexes; without it, pages are fetched and parsed and the pairs counted.

The requests are those the VSPC API documents and syncd also sends: `limit`, `offset` and
`sort` (on all three fields: a total order) query parameters, a bearer API key and
`X-Client-Version`. Later pages advance by `page_size - 1`, so each repeats the previous
page's last item, which is skipped: these are the pages the benchmark's simulator has
cached (a client advancing by `page_size` would ask for 0.2% fewer items, uncached).

SPEC.json: {"simulator_url", "tenants": [[name, api_key], ...], "page_size",
"pages_per_tenant", "pages_in_flight", "copy": bool, "database_url", "table"}. Run as a
process of its own so its start-up is paid as `syncd sync`'s is; prints one JSON object:
pairs, pages, copied, complete, inner_s (first request to last row), cpu_s, peak_rss_mb and
syncd_modules (any `syncd` module loaded: there must be none).
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

JOB_OBJECTS_PATH = "/api/v3/infrastructure/backupServers/jobs/backupCopyJobs/jobObjects"
SORT = orjson.dumps(
    [
        {"property": name, "direction": "ascending"}
        for name in ("jobUid", "linkedJobUid", "uniqueJobUid")
    ]
).decode()
CLIENT_VERSION = "3.6"
# Stored for a pair without uniqueJobUid (older servers), so every column is NOT NULL.
NIL_UUID = "00000000-0000-0000-0000-000000000000"
QUEUED_PAGES = 64  # pages parsed but not yet copied: bounds memory when PostgreSQL lags

Row = tuple[str, str, str]


def later_offsets(total: int, page_size: int) -> list[int]:
    """Offsets after the first page's 0, each page repeating the previous page's last item,
    until the pages reach `total`."""
    stride = page_size - 1 if page_size > 1 else 1
    offsets: list[int] = []
    end = page_size
    while end < total:
        offsets.append(end - page_size + stride)
        end = offsets[-1] + page_size
    return offsets


class Fetcher:
    """Reads every tenant's pages and hands each page's rows to `sink`."""

    def __init__(self, spec: dict[str, Any], session: aiohttp.ClientSession) -> None:
        self.spec = spec
        self.session = session
        self.endpoint = spec["simulator_url"].rstrip("/") + JOB_OBJECTS_PATH
        self.page_size: int = spec["page_size"]
        self.in_flight = asyncio.Semaphore(spec["pages_in_flight"])
        self.pages = 0
        self.complete = True

    async def _get(self, api_key: str, offset: int) -> dict[str, Any]:
        params = {"limit": str(self.page_size), "offset": str(offset), "sort": SORT}
        headers = {
            "Authorization": f"Bearer {api_key}",
            "Accept": "application/json",
            "X-Client-Version": CLIENT_VERSION,
        }
        async with (
            self.in_flight,
            self.session.get(self.endpoint, params=params, headers=headers) as response,
        ):
            body = await response.read()
        if response.status != 200:
            raise RuntimeError(f"offset {offset}: HTTP {response.status}: {body[:200]!r}")
        self.pages += 1
        document: dict[str, Any] = orjson.loads(body)
        return document

    @staticmethod
    def _rows(data: list[dict[str, str]], skip: int) -> list[Row]:
        return [
            (item["jobUid"], item.get("uniqueJobUid") or NIL_UUID, item["linkedJobUid"])
            for item in data[skip:]
        ]

    async def tenant(self, api_key: str, sink: asyncio.Queue[list[Row] | None]) -> int:
        """Every pair of one tenant into `sink`; the number of pairs."""
        first = await self._get(api_key, 0)
        total: int = first["meta"]["pagingInfo"]["total"]
        rows = self._rows(first["data"], 0)
        await sink.put(rows)
        pairs = len(rows)
        per_tenant = asyncio.Semaphore(self.spec["pages_per_tenant"])

        async def page(offset: int) -> int:
            async with per_tenant:
                document = await self._get(api_key, offset)
            if document["meta"]["pagingInfo"]["total"] != total:
                self.complete = False
            rows = self._rows(document["data"], 1)
            await sink.put(rows)
            return len(rows)

        counts = await asyncio.gather(
            *(page(offset) for offset in later_offsets(total, self.page_size))
        )
        pairs += sum(counts)
        if pairs != total:
            self.complete = False
        return pairs


async def _drain(queue: asyncio.Queue[list[Row] | None]) -> int:
    """Consumes pages without copying (the fetch-only limit); rows seen."""
    rows = 0
    while (page := await queue.get()) is not None:
        rows += len(page)
    return rows


async def _copy(queue: asyncio.Queue[list[Row] | None], spec: dict[str, Any]) -> int:
    """One binary COPY of every queued row into `spec["table"]`; rows copied."""
    connection = await asyncpg.connect(spec["database_url"])
    try:
        table = spec["table"]
        await connection.execute(
            f"DROP TABLE IF EXISTS {table}; CREATE UNLOGGED TABLE {table} "
            "(job_uid uuid NOT NULL, unique_job_uid uuid NOT NULL, linked_job_uid uuid NOT NULL)"
        )

        async def records() -> AsyncIterator[Row]:
            while (page := await queue.get()) is not None:
                for row in page:
                    yield row

        status = await connection.copy_records_to_table(table, records=records())
        return int(status.split()[-1])
    finally:
        await connection.close()


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Fetches (and copies) every tenant's pairs once; the figures."""
    queue: asyncio.Queue[list[Row] | None] = asyncio.Queue(maxsize=QUEUED_PAGES)
    connector = aiohttp.TCPConnector(limit=spec["pages_in_flight"])
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        fetcher = Fetcher(spec, session)

        async def fetch_all() -> list[int]:
            counts = await asyncio.gather(
                *(fetcher.tenant(key, queue) for _, key in spec["tenants"])
            )
            await queue.put(None)
            return counts

        # A failing side raises out of gather; asyncio.run then cancels the other.
        counts, consumed = await asyncio.gather(
            fetch_all(), _copy(queue, spec) if spec["copy"] else _drain(queue)
        )
    inner_s = time.perf_counter() - started
    pairs = sum(counts)
    return {
        "pairs": pairs,
        "pages": fetcher.pages,
        "copied": consumed if spec["copy"] else None,
        "complete": fetcher.complete and consumed == pairs,
        "inner_s": inner_s,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: the spec file's path as the only argument, the figures on stdout."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.limit SPEC.json", file=sys.stderr)
        return 2
    spec = orjson.loads(Path(args[0]).read_bytes())
    figures = asyncio.run(run(spec))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures["cpu_s"] = usage.ru_utime + usage.ru_stime
    figures["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    figures["syncd_modules"] = sorted(
        name for name in sys.modules if name == "syncd" or name.startswith("syncd.")
    )
    sys.stdout.write(orjson.dumps(figures).decode() + "\n")
    return 0 if figures["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
