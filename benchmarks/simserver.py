"""The simulated VSPC of a benchmark, in a process of its own (`python -m benchmarks.simserver`).

Serves `simulator.make_dataset(...)` with the production `run_simulator` (no routes added):
the tenants' periodic links, and a catalog of `--jobs-per-tenant` jobs (on a few backup
servers of a few organizations) unrelated to them, empty by default; the immediate links
are empty. Every collection syncd reads answers, so a sync does what it does in production.
The parent talks to it through pipes, one JSON object per line:

- stdout, once ready: `{"url", "pid", "tenants": [{"name", "api_key"}], "pairs", "warm_s"}`;
- stdin `{"cmd": "churn", "fraction": 0.01}`: every tenant loses and gains `fraction` of its
  pairs (`SimulatorState.churn`), the page cache is warmed again, and the answer is
  `{"removed", "added", "warm_s"}`;
- stdin `{"cmd": "mark"}`: clears the request log (so it stays small however many phases
  run) and answers `{"marked_at"}`, this process's `time.monotonic()`;
- stdin `{"cmd": "first_request"}`: answers `{"first_request_at", "requests"}`, the
  `time.monotonic()` at which the first request since the mark arrived (None if none did)
  and how many arrived. On Linux `time.monotonic()` is CLOCK_MONOTONIC, one clock for every
  process, so the parent can subtract the time it spawned a client;
- stdin `{"cmd": "quit"}` or end of input: stops.

Warming fetches every page a syncd snapshot will ask for, of every collection, over HTTP
with the same query, so that the measured phases only ever get cached page bodies and the
simulator's CPU stays small.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from syncd import collections, paging
from syncd import simulator as sim
from syncd.simulator import dataset

CLIENT_VERSION = "3.6"
WARM_CONCURRENCY = 8


async def warm(url: str, tenants: Sequence[sim.SimTenant], page_size: int) -> float:
    """Requests every page of every collection of every tenant once (sorted as syncd sorts);
    returns seconds."""
    started = time.perf_counter()
    requests: list[tuple[str, str, str, int]] = []
    for tenant in tenants:
        for spec in collections.COLLECTIONS.values():
            total = len(tenant.collection(spec.name))
            offsets = [0, *paging.plan_offsets(total, page_size)] if total else [0]
            sort = paging.sort_param(spec)
            requests.extend((tenant.api_key, url + spec.path, sort, offset) for offset in offsets)
    pending = iter(requests)

    async def worker(session: aiohttp.ClientSession) -> None:
        for api_key, endpoint, sort, offset in pending:
            params = {"limit": str(page_size), "offset": str(offset), "sort": sort}
            headers = {"Authorization": f"Bearer {api_key}", "X-Client-Version": CLIENT_VERSION}
            async with session.get(endpoint, params=params, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"warming {offset}: HTTP {response.status}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(WARM_CONCURRENCY)))
    return time.perf_counter() - started


def _freeze() -> None:
    """Moves the dataset and the cached pages out of the garbage collector's sight: at 10M
    pairs a full collection walks tens of millions of objects, and the measured client
    would wait seconds for an answer (the simulator's pause, not the client's)."""
    gc.collect()
    gc.freeze()


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(message).decode() + "\n")
    sys.stdout.flush()


async def serve(
    *, tenants: int, pairs: int, seed: int, page_size: int, jobs_per_tenant: int = 0
) -> None:
    """Serves the dataset and answers the parent's commands until told to quit."""
    tenant_data = sim.make_dataset(
        tenants=tenants, pairs_per_tenant=pairs, seed=seed, catalog=False
    )
    for tenant in tenant_data:
        if jobs_per_tenant:
            rng = random.Random(f"bench-catalog:{seed}:{tenant.name}")
            dataset.make_jobs(tenant, jobs_per_tenant, rng)
    state = sim.SimulatorState(tenant_data, seed=seed)
    loop = asyncio.get_running_loop()
    async with sim.run_simulator(state) as url:
        warm_s = await warm(url, tenant_data, page_size)
        _freeze()
        state.reset_observations()
        _say(
            {
                "url": url,
                "pid": os.getpid(),
                "tenants": [{"name": t.name, "api_key": t.api_key} for t in tenant_data],
                "pairs": sum(len(t.items) for t in tenant_data),
                "jobs": sum(len(t.jobs) for t in tenant_data),
                "warm_s": warm_s,
            }
        )
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                return
            command = orjson.loads(line)
            if command["cmd"] == "quit":
                return
            if command["cmd"] == "churn":
                removed = added = 0
                for tenant in tenant_data:
                    gone, new = state.churn(tenant.name, float(command["fraction"]))
                    removed, added = removed + gone, added + new
                warm_s = await warm(url, tenant_data, page_size)
                _freeze()
                _say({"removed": removed, "added": added, "warm_s": warm_s})
            elif command["cmd"] == "mark":
                state.reset_observations()
                _say({"marked_at": time.monotonic()})
            elif command["cmd"] == "first_request":
                log = state.request_log
                _say(
                    {
                        "first_request_at": log[0].started_at if log else None,
                        "requests": len(log),
                    }
                )
            else:
                _say({"error": f"unknown command {command['cmd']!r}"})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python -m benchmarks.simserver --tenants T --pairs N`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simserver")
    parser.add_argument("--tenants", type=int, required=True)
    parser.add_argument("--pairs", type=int, required=True, help="pairs per tenant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=paging.MAX_PAGE_SIZE)
    parser.add_argument("--jobs-per-tenant", type=int, default=0, help="catalog jobs per tenant")
    args = parser.parse_args(argv)
    asyncio.run(
        serve(
            tenants=args.tenants,
            pairs=args.pairs,
            seed=args.seed,
            page_size=args.page_size,
            jobs_per_tenant=args.jobs_per_tenant,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
