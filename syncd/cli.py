"""The `syncd` command line.

Exit codes (a public interface: cron wrappers and orchestrators read them):
  0  everything asked for succeeded (tenants skipped as busy count as success)
  1  something failed: a tenant's run was partial or failed, the database was unreachable,
     the schema is behind
  2  usage or configuration error
Errors print their chain of causes on stderr; the traceback only with `--log-level debug`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

import syncd
from syncd import config, db, embedded, errors, logs
from syncd.sync import SyncResult, sync_tenant

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

log = structlog.get_logger(__name__)


class UsageError(errors.SyncdError):
    """The command line asks for something that cannot be done (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `syncd` command."""
    parser = argparse.ArgumentParser(
        prog="syncd",
        description="Keep a PostgreSQL copy of VSPC backup copy job links, with history.",
    )
    parser.add_argument("--version", action="version", version=f"syncd {syncd.__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"config file (default: ${config.CONFIG_ENV}, then ./{config.DEFAULT_CONFIG_NAME})",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the embedded PostgreSQL keeps its files when no database.url is set "
        f"(default: {embedded.default_data_dir()})",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "text"],
        help="auto: text on a terminal, JSON lines otherwise",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("migrate", help="upgrade the database schema to this syncd's version")

    sync = commands.add_parser("sync", help="sync every (or the named) tenant once, then exit")
    sync.add_argument(
        "--tenant", action="append", default=[], metavar="NAME", help="sync only this tenant"
    )
    sync.add_argument(
        "--allow-mass-delete",
        action="store_true",
        help="apply removals even when they exceed max_delete_fraction",
    )

    run = commands.add_parser("run", help="run as a daemon: sync every tenant on its schedule")
    run.add_argument(
        "--listen",
        default=None,
        metavar="HOST:PORT",
        help="address of /healthz, /readyz, /metrics, /status (default: [daemon] listen)",
    )

    check = commands.add_parser(
        "check", help="validate the config and try each tenant's credentials and first page"
    )
    check.add_argument("--tenant", action="append", default=[], metavar="NAME")

    status = commands.add_parser("status", help="per-tenant last run, status and pairs")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    grant = commands.add_parser(
        "grant-reader", help="let a PostgreSQL role SELECT the reporting views and nothing else"
    )
    grant.add_argument("role", help="an existing PostgreSQL role")

    demo = commands.add_parser(
        "demo", help="sync the bundled simulator into an embedded PostgreSQL and show the result"
    )
    demo.add_argument("--pairs", type=int, default=1000, help="pairs per simulated tenant")
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the embedded PostgreSQL (and the simulator) up after the demo, until Ctrl-C",
    )

    simulate = commands.add_parser("simulate", help="serve the bundled VSPC simulator")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8080)
    simulate.add_argument("--tenants", type=int, default=3)
    simulate.add_argument("--pairs", type=int, default=5000, help="pairs per tenant")
    simulate.add_argument("--seed", type=int, default=0)
    return parser


def _load_config(args: argparse.Namespace) -> config.Config:
    path = config.find_config_path(args.config)
    loaded = config.load_config(path)
    for secret_file in loaded.secret_files:
        if not config.loosely_readable(secret_file):
            continue
        if secret_file == path:
            log.warning(
                "the config file is readable by other users and syncd holds secrets in it: "
                "chmod 600 it, or move them to api_key_file/password_file or the environment",
                path=str(path),
            )
        else:
            log.warning(
                f"secret file {secret_file} is readable by other users: chmod 600 it",
                path=str(secret_file),
            )
    return loaded


@contextlib.asynccontextmanager
async def open_configured_engine(
    cfg: config.Config, data_dir: Path | None, *, extra_connections: int = 2
) -> AsyncIterator[AsyncEngine]:
    """The engine for `database.url`, or for an embedded PostgreSQL when none is set."""
    pool_size = cfg.database.pool_size or cfg.daemon.max_concurrent_tenants + extra_connections
    async with contextlib.AsyncExitStack() as stack:
        if cfg.database.url is not None:
            url = cfg.database.url.get_secret_value()
        else:
            url = await stack.enter_async_context(
                embedded.running(data_dir or embedded.default_data_dir())
            )
        engine = await stack.enter_async_context(
            db.open_engine(
                url,
                pool_size=pool_size,
                statement_timeout_s=cfg.database.statement_timeout_s,
                connect_timeout_s=cfg.database.connect_timeout_s,
            )
        )
        yield engine


@contextlib.asynccontextmanager
async def open_migrated_engine(
    cfg: config.Config, data_dir: Path | None
) -> AsyncIterator[AsyncEngine]:
    """`open_configured_engine`, refusing (`SchemaBehindError`) unless the schema is at head."""
    async with open_configured_engine(cfg, data_dir) as engine:
        await db.require_schema_at_head(engine)
        yield engine


async def cmd_migrate(args: argparse.Namespace, cfg: config.Config) -> int:
    async with open_configured_engine(cfg, args.data_dir) as engine:
        before = await db.schema_state(engine)
        after = await db.migrate(engine)
    if before.current == after.current:
        print(f"schema already at {after.current}")
    else:
        print(f"schema upgraded from {before.current or 'nothing'} to {after.current}")
    return EXIT_OK


def select_tenants(cfg: config.Config, names: Sequence[str]) -> list[config.Tenant]:
    """The tenants named on the command line (all when none); UsageError for unknown names."""
    if not names:
        return list(cfg.tenants)
    unknown = [name for name in names if name not in {t.name for t in cfg.tenants}]
    if unknown:
        configured = ", ".join(t.name for t in cfg.tenants) or "none"
        raise UsageError(f"unknown tenant(s): {', '.join(unknown)} (configured: {configured})")
    return [cfg.tenant(name) for name in dict.fromkeys(names)]


class RichProgress:
    """Per-tenant progress bars (pairs received of the snapshot's total)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def advance(self, tenant: str, pairs: int, total: int | None) -> None:
        task = self._tasks.get(tenant)
        if task is None:
            task = self._tasks[tenant] = self._progress.add_task(tenant, total=total)
        self._progress.update(task, advance=pairs, total=total)


async def sync_all(
    tenants: Sequence[config.Tenant],
    engine: AsyncEngine,
    *,
    max_concurrent_tenants: int,
    allow_mass_delete: bool = False,
    progress: RichProgress | None = None,
) -> list[SyncResult]:
    """Syncs `tenants` concurrently, at most `max_concurrent_tenants` at once."""
    limit = asyncio.Semaphore(max_concurrent_tenants)

    async def one(tenant: config.Tenant) -> SyncResult:
        async with limit:
            try:
                return await sync_tenant(
                    tenant, engine, allow_mass_delete=allow_mass_delete, progress=progress
                )
            except errors.DatabaseError as exc:
                return SyncResult(tenant=tenant.name, status="failed", error=str(exc))

    return list(await asyncio.gather(*(one(tenant) for tenant in tenants)))


def summary_table(results: Sequence[SyncResult]) -> Table:
    """The table `syncd sync` prints at the end."""
    table = Table(title="syncd sync")
    for column in ("tenant", "status", "pairs", "added", "removed", "pages", "seconds", "error"):
        table.add_column(column, overflow="fold")
    for result in results:
        table.add_row(
            result.tenant,
            result.status,
            "" if result.current_pairs is None else str(result.current_pairs),
            str(result.added),
            str(result.removed),
            str(result.pages_fetched),
            f"{result.duration_s:.2f}",
            result.error or "",
        )
    return table


def sync_exit_code(results: Sequence[SyncResult]) -> int:
    """0 when every tenant succeeded or was skipped as busy, else 1."""
    ok = all(result.status in ("succeeded", "skipped") for result in results)
    return EXIT_OK if ok else EXIT_FAILED


def make_console() -> Console:
    """Console for tables: piped output (CI logs, `| less`) gets 160 columns, not rich's 80."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


async def sync_with_progress(
    console: Console,
    tenants: Sequence[config.Tenant],
    engine: AsyncEngine,
    *,
    max_concurrent_tenants: int,
    allow_mass_delete: bool = False,
) -> list[SyncResult]:
    """`sync_all` with progress bars on a terminal, plain log lines otherwise."""
    if not console.is_terminal:
        return await sync_all(
            tenants,
            engine,
            max_concurrent_tenants=max_concurrent_tenants,
            allow_mass_delete=allow_mass_delete,
        )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        return await sync_all(
            tenants,
            engine,
            max_concurrent_tenants=max_concurrent_tenants,
            allow_mass_delete=allow_mass_delete,
            progress=RichProgress(bar),
        )


async def cmd_sync(args: argparse.Namespace, cfg: config.Config) -> int:
    tenants = select_tenants(cfg, args.tenant)
    if not tenants:
        raise UsageError("no tenants configured: add [[tenants]] to the config file")
    if args.allow_mass_delete and not args.tenant:
        raise UsageError("--allow-mass-delete needs --tenant NAME: allow it one tenant at a time")
    console = make_console()
    async with open_migrated_engine(cfg, args.data_dir) as engine:
        results = await sync_with_progress(
            console,
            tenants,
            engine,
            max_concurrent_tenants=cfg.daemon.max_concurrent_tenants,
            allow_mass_delete=args.allow_mass_delete,
        )
    console.print(summary_table(results))
    return sync_exit_code(results)


async def cmd_simulate(args: argparse.Namespace) -> int:
    from syncd import simulator

    await simulator.serve(
        host=args.host, port=args.port, tenants=args.tenants, pairs=args.pairs, seed=args.seed
    )
    return EXIT_OK


async def _dispatch(args: argparse.Namespace, scrubber: logs.SecretScrubber) -> int:
    if args.command == "simulate":
        return await cmd_simulate(args)
    if args.command == "demo":
        from syncd import demo

        return await demo.run_demo(args)
    cfg = _load_config(args)
    scrubber.register(cfg.secrets())
    handlers: dict[str, Callable[[argparse.Namespace, config.Config], Awaitable[int]]] = {
        "migrate": cmd_migrate,
        "sync": cmd_sync,
    }
    if args.command in handlers:
        return await handlers[args.command](args, cfg)
    if args.command == "run":
        from syncd import daemon

        return await daemon.run_daemon(
            cfg,
            data_dir=args.data_dir,
            config_path=cfg.path,
            listen=args.listen,
            scrubber=scrubber,
        )
    from syncd import ops

    if args.command == "check":
        return await ops.cmd_check(args, cfg)
    if args.command == "status":
        return await ops.cmd_status(args, cfg)
    if args.command == "grant-reader":
        return await ops.cmd_grant_reader(args, cfg)
    raise UsageError(f"unknown command {args.command!r}")


def _print_error(exc: BaseException) -> None:
    chain = errors.cause_chain(exc)
    print(f"syncd: error: {chain[0]}", file=sys.stderr)
    for cause in chain[1:]:
        print(f"  caused by: {cause}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `syncd` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    scrubber = logs.configure(level=args.log_level, log_format=args.log_format)
    try:
        return asyncio.run(_dispatch(args, scrubber))
    except (errors.ConfigError, UsageError) as exc:
        _print_error(exc)
        return EXIT_USAGE
    except errors.SyncdError as exc:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            log.exception("command failed")
        _print_error(exc)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("syncd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
