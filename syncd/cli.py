"""The `syncd` command line: argument parsing, dispatch and error printing, nothing else.

Exit codes (a public interface: cron wrappers and orchestrators read them):
  0  everything asked for succeeded (tenants skipped as busy count as success)
  1  something failed: a tenant's run was partial or failed, the database was unreachable,
     the schema is behind
  2  usage or configuration error
Errors print their chain of causes on stderr; the traceback only with `--log-level debug`.

Each command's module is imported only when that command runs, and logging and the config
loader only once the arguments parsed: `syncd --version` and `--help` start in tens of
milliseconds, and a cron job's `syncd sync` does not pay for the daemon, the simulator or
Alembic.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import syncd
from syncd.environment import CONFIG_ENV, DEFAULT_CONFIG_NAME

if TYPE_CHECKING:
    import asyncio

    from syncd import config, logs

# command -> (module, function, whether it reads the config file). A config-reading
# command's function takes (args, cfg, scrubber); the others (args, scrubber).
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "migrate": ("syncd.ops", "cmd_migrate", True),
    "sync": ("syncd.ops", "cmd_sync", True),
    "run": ("syncd.daemon", "cmd_run", True),
    "check": ("syncd.ops", "cmd_check", True),
    "status": ("syncd.ops", "cmd_status", True),
    "grant-reader": ("syncd.ops", "cmd_grant_reader", True),
    "demo": ("syncd.demo", "cmd_demo", False),
    "simulate": ("syncd.simulator", "cmd_simulate", False),
}


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
        help=f"config file (default: ${CONFIG_ENV}, then ./{DEFAULT_CONFIG_NAME})",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the embedded PostgreSQL keeps its files when no database.url is set "
        "(default: a 'syncd/postgres' folder in the user's data directory)",
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
        help="apply removals even when they exceed max_delete_fraction (and reset the "
        "mass-delete guard's baseline)",
    )

    run = commands.add_parser("run", help="run as a daemon: sync every tenant on its schedule")
    run.add_argument(
        "--listen",
        default=None,
        metavar="HOST:PORT",
        help="address of /healthz, /readyz, /metrics, /status (default: [daemon] listen)",
    )

    check = commands.add_parser(
        "check",
        help="validate the config and try each tenant's credentials and collections' first pages",
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
    import structlog

    from syncd import config, logs

    loaded = config.load_config(config.find_config_path(args.config))
    log = structlog.get_logger(__name__)
    for warning in config.config_warnings(loaded):
        logs.log_config_warning(log, warning)
    return loaded


async def _dispatch(args: argparse.Namespace, scrubber: logs.SecretScrubber) -> int:
    module_name, function_name, reads_config = COMMANDS[args.command]
    command: Callable[..., Awaitable[int]] = getattr(
        importlib.import_module(module_name), function_name
    )
    if not reads_config:
        return await command(args, scrubber)
    cfg = _load_config(args)
    scrubber.register(cfg.secrets())
    return await command(args, cfg, scrubber)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (the `speed` extra), else None: asyncio's
    own loop. The same commands run on either; uvloop spends less CPU per request."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _print_error(exc: BaseException, scrubber: logs.SecretScrubber) -> None:
    from syncd import errors

    def clean(text: str) -> str:
        # Line by line: a configuration error lists one problem per line.
        return "\n".join(errors.clean_text(line) for line in scrubber.scrub(text).split("\n"))

    chain = [clean(text) for text in errors.cause_chain(exc)]
    print(f"syncd: error: {chain[0]}", file=sys.stderr)
    for cause in chain[1:]:
        print(f"  caused by: {cause}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `syncd` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    import asyncio
    import logging

    import structlog

    from syncd import errors, logs

    scrubber = logs.configure(level=args.log_level, log_format=args.log_format)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(_dispatch(args, scrubber))
    except (errors.ConfigError, errors.UsageError) as exc:
        _print_error(exc, scrubber)
        return errors.EXIT_USAGE
    except errors.SyncdError as exc:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            structlog.get_logger(__name__).exception("command failed")
        _print_error(exc, scrubber)
        return errors.EXIT_FAILED
    except KeyboardInterrupt:
        print("syncd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
