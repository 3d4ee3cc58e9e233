"""The benchmark script runs end to end at a tiny size and reports every phase and figure;
its limit is written without syncd."""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import orjson
import pytest

from benchmarks import limit, load_floor
from syncd import collections, paging

REPO = Path(__file__).resolve().parent.parent
PHASES = (
    "limit_fetch",
    "limit_fetch_copy",
    "parse",
    "fetch",
    "fetch_copy",
    "initial",
    "noop",
    "churn",
    "initial_in_process",
    "noop_in_process",
    "churn_in_process",
)
PROCESS_PHASES = ("limit_fetch", "limit_fetch_copy", "initial", "noop", "churn")
FIGURES = (
    "seconds",
    "scope",
    "pairs",
    "pairs_per_s",
    "ratio_to_limit",
    "client_cpu_s",
    "pg_cpu_s",
    "simulator_cpu_s",
    "baseline_rss_mb",
    "peak_rss_mb",
    "rows_written",
    "wal_bytes",
    "runs",
)


@pytest.mark.parametrize("module", [limit, load_floor], ids=["limit", "load_floor"])
def test_the_yardsticks_import_nothing_of_syncd_or_the_benchmarks(module: object) -> None:
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))  # type: ignore[attr-defined]
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import would reach the benchmarks package"
            imported.add(node.module or "")
    tops = {name.partition(".")[0] for name in imported}
    assert tops <= {*sys.stdlib_module_names, "aiohttp", "asyncpg", "orjson"}, tops


def test_the_limit_asks_for_the_pages_syncd_asks_for() -> None:
    # Written independently, but the same requests: else the simulator's cache would
    # favour one of them.
    assert collections.BACKUP_COPY_JOB_OBJECTS.path == limit.JOB_OBJECTS_PATH
    assert orjson.loads(limit.SORT) == orjson.loads(paging.SORT_PARAM)
    for total in (0, 1, 499, 500, 501, 998, 999, 1000, 10_000, 12_345):
        for page_size in (2, 3, 100, 500):
            assert limit.later_offsets(total, page_size) == list(
                paging.plan_offsets(total, page_size)
            ), (total, page_size)


def run_benchmark(
    pg_server_url: str, *args: str, module: str = "benchmarks.sync"
) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS` against the test server; asserts it exited 0."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, "SYNCD_BENCH_DATABASE_URL": pg_server_url},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_benchmark_reports_every_phase_and_figure(pg_server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_benchmark(
        pg_server_url,
        "--tenants=2",
        "--pairs-per-tenant=200",
        "--repeat=1",
        "--bloat-rounds=1",
        "--in-process-syncs",
        f"--json={out}",
    )
    assert "initial sync" in result.stdout and "targets" in result.stdout

    report = orjson.loads(out.read_bytes())
    assert report["setup"]["pairs"] == 400
    assert set(report["phases"]) == set(PHASES)
    for phase in PHASES:
        figures = report["phases"][phase]
        missing = [name for name in FIGURES if name not in figures]
        assert not missing, f"{phase} lacks {missing}"
        assert figures["pairs"] == 400
        assert set(figures["rows_written"]) == {"links", "catalog_items", "runs", "tenants"}
        assert len(figures["runs"]) == 1
    assert report["phases"]["parse"]["parse_cpu_s"] >= 0
    for phase in PROCESS_PHASES:
        figures = report["phases"][phase]
        assert figures["scope"] == "process"
        assert figures["first_request_s"] is not None, f"{phase}: no request seen"
        assert "pg_database_cpu_s" in figures
    assert report["phases"]["limit_fetch_copy"]["ratio_to_limit"] == 1
    assert report["phases"]["limit_fetch_copy"]["copied"] == 400
    for run in report["phases"]["limit_fetch_copy"]["runs"]:
        assert run["syncd_modules"] == []
    assert report["phases"]["fetch"]["ratio_to_limit_fetch"] is not None
    assert len(report["startup"]["version_runs_s"]) >= 3
    for prefix in ("", "_in_process"):
        initial, noop, churn = (report["phases"][p + prefix] for p in ("initial", "noop", "churn"))
        # The exact copy's write pattern: everything once, then nothing, then only the changes.
        assert initial["rows_written"]["links"] == initial["added"] == 400
        assert noop["rows_written"]["links"] == noop["added"] == noop["removed"] == 0
        assert churn["added"] == churn["removed"] == 4
        assert churn["rows_written"]["links"] == 8
    targets = {target["target"]: target for target in report["targets"]}
    for phase in ("initial", "noop", "churn"):
        assert f"{_title(phase)} / limit (whole process)" in targets
    assert {
        "syncd fetch-only / plain aiohttp fetch",
        "`syncd --version` wall time",
        "spawn to first VSPC request (worst sync phase)",
        "peak RSS of `syncd sync` (worst sync phase)",
        "no-op WAL",
    } <= set(targets)
    for target in targets.values():
        assert {"limit", "stretch", "value", "unit", "met"} <= set(target)
    bloat = report["bloat"]
    assert bloat["rounds"] == 1
    for state in ("before", "after", "after_vacuum"):
        assert {"heap_bytes", "total_bytes", "indexes", "rows", "n_dead_tup"} <= set(bloat[state])
    assert not asyncio.run(_database_exists(pg_server_url, report["setup"]["database"]))


async def _database_exists(server_url: str, name: str) -> bool:
    connection = await asyncpg.connect(server_url)
    try:
        return bool(await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await connection.close()


def _title(phase: str) -> str:
    return {"initial": "initial sync", "noop": "no-op re-sync", "churn": "1% churn re-sync"}[phase]


@pytest.mark.slow
def test_the_scaling_study_compares_time_per_link(pg_server_url: str, tmp_path: Path) -> None:
    # Tiny sizes, only so that --scaling cannot rot; its real sizes take minutes.
    out = tmp_path / "scaling.json"
    result = run_benchmark(
        pg_server_url, "--scaling", "--scaling-sizes=2x100,4x50", "--repeat=1", f"--json={out}"
    )
    assert "scaling targets" in result.stdout

    scaling = orjson.loads(out.read_bytes())["scaling"]
    assert [(s["tenants"], s["pairs_per_tenant"]) for s in scaling["sizes"]] == [(2, 100), (4, 50)]
    for size in scaling["sizes"]:
        assert size["pairs"] == 200
        assert set(size["us_per_link"]) == {"limit_fetch_copy", "initial", "noop", "churn"}
        assert all(value is not None for value in size["per_link_vs_first"].values())
    assert [target["limit"] for target in scaling["targets"]] == [1.15] * 3


def test_the_load_floor_loads_every_row_with_each_session_count(
    pg_server_url: str, db_url: str
) -> None:
    result = run_benchmark(
        pg_server_url,
        f"--database-url={db_url}",
        "--tenants=3",
        "--pairs-per-tenant=50",
        "--sessions=1,2",
        module="benchmarks.load_floor",
    )
    figures = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [f["sessions"] for f in figures] == [1, 2]
    assert all(f["rows"] == 150 and f["seconds"] > 0 for f in figures)
