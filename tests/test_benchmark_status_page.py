"""The status page benchmark runs end to end at a tiny size and reports its figures."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
async def test_status_page_benchmark_reports_queries_and_rendering(pg_server_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.status_page",
        "--tenants",
        "12",
        "--days",
        "2",
        "--repeat",
        "2",
        cwd=REPO,
        env={**os.environ, "SYNCD_BENCH_DATABASE_URL": pg_server_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    text = out.decode()
    assert process.returncode == 0, text + err.decode()
    assert "12 tenants, 2,304 runs over 2 days" in text
    for line in ("history queries: median", "page rendering:  first view", "page size:"):
        assert line in text, text
    # Both queries' plans are shown.
    assert "--- plan: last 24 hours" in text and "--- plan: last runs per tenant" in text
