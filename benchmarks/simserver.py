"""The simulated VSPC of a benchmark, in a process of its own (`python -m benchmarks.simserver`).

Serves `simulator.make_dataset(...)` with the production `run_simulator` (no routes added).
The parent talks to it through pipes, one JSON object per line:

- stdout, once ready: `{"url", "pid", "tenants": [{"name", "api_key"}], "pairs", "warm_s"}`;
- stdin `{"cmd": "churn", "fraction": 0.01}`: every tenant loses and gains `fraction` of its
  pairs (`SimulatorState.churn`), the page cache is warmed again, and the answer is
  `{"removed", "added", "warm_s"}`;
- stdin `{"cmd": "quit"}` or end of input: stops.

Warming fetches every page a syncd snapshot will ask for, over HTTP with the same query, so
that the measured phases only ever get cached page bodies and the simulator's CPU stays small.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from syncd import paging
from syncd import simulator as sim

CLIENT_VERSION = "3.6"
WARM_CONCURRENCY = 8


async def warm(url: str, tenants: Sequence[sim.SimTenant], page_size: int) -> float:
    """Requests every page of every tenant once (sorted as syncd sorts); returns seconds."""
    started = time.perf_counter()
    endpoint = url + sim.JOB_OBJECTS_PATH
    requests: list[tuple[str, int]] = []
    for tenant in tenants:
        total = len(tenant.items)
        offsets = [0, *paging.plan_offsets(total, page_size)] if total else [0]
        requests.extend((tenant.api_key, offset) for offset in offsets)
    pending = iter(requests)

    async def worker(session: aiohttp.ClientSession) -> None:
        for api_key, offset in pending:
            params = {"limit": str(page_size), "offset": str(offset), "sort": paging.SORT_PARAM}
            headers = {"Authorization": f"Bearer {api_key}", "X-Client-Version": CLIENT_VERSION}
            async with session.get(endpoint, params=params, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"warming {offset}: HTTP {response.status}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(WARM_CONCURRENCY)))
    return time.perf_counter() - started


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(message).decode() + "\n")
    sys.stdout.flush()


async def serve(*, tenants: int, pairs: int, seed: int, page_size: int) -> None:
    """Serves the dataset and answers the parent's commands until told to quit."""
    dataset = sim.make_dataset(tenants=tenants, pairs_per_tenant=pairs, seed=seed)
    state = sim.SimulatorState(dataset, seed=seed)
    loop = asyncio.get_running_loop()
    async with sim.run_simulator(state) as url:
        warm_s = await warm(url, dataset, page_size)
        state.reset_observations()
        _say(
            {
                "url": url,
                "pid": os.getpid(),
                "tenants": [{"name": t.name, "api_key": t.api_key} for t in dataset],
                "pairs": sum(len(t.items) for t in dataset),
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
                for tenant in dataset:
                    gone, new = state.churn(tenant.name, float(command["fraction"]))
                    removed, added = removed + gone, added + new
                warm_s = await warm(url, dataset, page_size)
                _say({"removed": removed, "added": added, "warm_s": warm_s})
            else:
                _say({"error": f"unknown command {command['cmd']!r}"})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python -m benchmarks.simserver --tenants T --pairs N`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simserver")
    parser.add_argument("--tenants", type=int, required=True)
    parser.add_argument("--pairs", type=int, required=True, help="pairs per tenant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=paging.MAX_PAGE_SIZE)
    args = parser.parse_args(argv)
    asyncio.run(
        serve(tenants=args.tenants, pairs=args.pairs, seed=args.seed, page_size=args.page_size)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
