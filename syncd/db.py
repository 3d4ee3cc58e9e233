"""Database plumbing: the engine (one per process), migrations, and the schema check.

The engine is owned by `open_engine` / `open_database`, async context managers that dispose
of it on exit; everything else receives it as an argument.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

import syncd
from syncd import config, embedded, errors, schema

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

log = structlog.get_logger(__name__)

# The newest migration script's revision: what the schema check compares the database
# with. Written here rather than read from the scripts because reading them means importing
# Alembic (a third of `syncd sync`'s start-up); tests/test_migrations.py fails, saying what
# to write, when a new script makes this stale.
HEAD_REVISION = "0008"


def is_database_error(exc: BaseException) -> bool:
    """True for an error of the database or its driver (SQLAlchemy-wrapped or raw asyncpg)."""
    return isinstance(
        exc,
        sa.exc.DBAPIError
        | sa.exc.InterfaceError
        | asyncpg.PostgresError
        | asyncpg.InterfaceError
        | OSError
        | errors.DatabaseError,
    )


@contextlib.contextmanager
def database_errors(action: str) -> Iterator[None]:
    """Turns the driver's errors into `errors.DatabaseError` ("try again later")."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, errors.DatabaseError) or not is_database_error(exc):
            raise
        raise errors.DatabaseError(f"{action}: {'; '.join(errors.cause_chain(exc))}") from exc


def migrations_path() -> Path:
    """Where the Alembic scripts are: inside the installed package, or at the repo's top."""
    packaged = Path(syncd.__file__).parent / "migrations"
    if (packaged / "env.py").is_file():
        return packaged
    source_tree = Path(syncd.__file__).parent.parent / "migrations"
    if (source_tree / "env.py").is_file():
        return source_tree
    raise errors.SyncdError(
        f"syncd's migration scripts are missing (looked in {packaged} and {source_tree}); "
        "reinstall syncd"
    )


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """An Alembic configuration built in code; no alembic.ini is needed at run time."""
    from alembic.config import Config as AlembicConfig

    alembic_cfg = AlembicConfig()
    alembic_cfg.set_main_option("script_location", str(migrations_path()))
    if connection is not None:
        alembic_cfg.attributes["connection"] = connection
    return alembic_cfg


PING_IDLE_AFTER_S = 60.0
"""A pooled connection idle longer than this is pinged before use (`_Liveness`)."""


def statement_timeout_setting(timeout_s: float) -> str:
    """PostgreSQL's `statement_timeout` (whole milliseconds) for `timeout_s`.

    At least 1 ms: PostgreSQL reads 0 as "no timeout at all".
    """
    return str(max(1, round(timeout_s * 1000)))


@contextlib.asynccontextmanager
async def open_engine(
    url: str,
    *,
    pool_size: int = 5,
    statement_timeout_s: float = 600.0,
    connect_timeout_s: float = 10.0,
    application_name: str = "syncd",
    synchronous_commit: bool = True,
) -> AsyncIterator[AsyncEngine]:
    """An async engine for `url` (any `postgresql://` form), disposed of on exit.

    Without `synchronous_commit`, a commit returns before its WAL reaches the disk (the
    sessions' `synchronous_commit = off`): a PostgreSQL crash may then lose the last
    fraction of a second of committed transactions, whole and in order, never part of
    one. The syncs take that: each transaction is a run's own record or its whole apply,
    and what a crash loses the next run syncs again; a small tenant's run was mostly
    waiting for its three flushes.
    """
    server_settings = {
        "application_name": application_name,
        "statement_timeout": statement_timeout_setting(statement_timeout_s),
    }
    if not synchronous_commit:
        server_settings["synchronous_commit"] = "off"
    engine = create_async_engine(
        config.normalize_database_url(url),
        pool_size=pool_size,
        max_overflow=2,
        # Instead of pool_pre_ping's three round trips per checkout (BEGIN, a ping,
        # ROLLBACK: most of a small tenant's run), `_Liveness`.
        pool_pre_ping=False,
        pool_recycle=3600,
        connect_args={
            "timeout": connect_timeout_s,
            "server_settings": server_settings,
        },
    )
    liveness = _Liveness(engine.dialect)
    sa.event.listen(engine.sync_engine, "checkin", liveness.checkin)
    sa.event.listen(engine.sync_engine, "checkout", liveness.checkout)
    try:
        yield engine
    finally:
        await engine.dispose()


class _Liveness:
    """Makes the pool replace a dead connection before handing it out, with a round trip
    only for a connection that sat idle long.

    A connection the server closed (a restart, an idle timeout, `pg_terminate_backend`) is
    seen without one: the driver reads every connection, idle ones too, and learns of the
    close as it arrives. One that was cut without a close (a NAT or load balancer dropping
    idle flows, often after 4-6 minutes) looks alive, so a connection idle for longer than
    `PING_IDLE_AFTER_S` is pinged first; between a daemon's runs most are. A connection
    that fails its ping, or dies unseen in between, fails its run's first statement as a
    database failure, and the pool discards it.
    """

    def __init__(self, dialect: sa.Dialect) -> None:
        self._dialect = dialect

    def checkin(self, dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    def checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise sa.exc.DisconnectionError("the database closed this pooled connection")
        idle_since = record.info.get("idle_since")
        if idle_since is not None and time.monotonic() - idle_since > PING_IDLE_AFTER_S:
            try:
                self._dialect.do_ping(dbapi_connection)
            except Exception as exc:
                raise sa.exc.DisconnectionError("a pooled connection did not answer") from exc


@contextlib.asynccontextmanager
async def autocommit(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A pooled connection on which each statement commits by itself: no BEGIN and COMMIT
    round trips around statements that are atomic alone (a small tenant's run is mostly
    round trips)."""
    async with engine.connect() as connection:
        yield await connection.execution_options(isolation_level="AUTOCOMMIT")


@contextlib.asynccontextmanager
async def open_configured_engine(
    cfg: config.Config,
    data_dir: Path | None,
    *,
    extra_connections: int = 2,
    synchronous_commit: bool = True,
) -> AsyncIterator[AsyncEngine]:
    """The engine for `database.url`, or for an embedded PostgreSQL when none is set.

    Pool: one connection per concurrent tenant run plus `extra_connections` (readiness
    checks, the status page), unless `database.pool_size` says otherwise. For
    `synchronous_commit`, see `open_engine`.
    """
    pool_size = cfg.database.pool_size or cfg.daemon.max_concurrent_tenants + extra_connections
    async with contextlib.AsyncExitStack() as stack:
        if cfg.database.url is not None:
            url = cfg.database.url.get_secret_value()
        else:
            url = await stack.enter_async_context(
                embedded.running(data_dir or embedded.default_data_dir())
            )
        engine = await stack.enter_async_context(
            open_engine(
                url,
                pool_size=pool_size,
                statement_timeout_s=cfg.database.statement_timeout_s,
                connect_timeout_s=cfg.database.connect_timeout_s,
                synchronous_commit=synchronous_commit,
            )
        )
        yield engine


@contextlib.asynccontextmanager
async def open_migrated_engine(
    cfg: config.Config, data_dir: Path | None, *, synchronous_commit: bool = True
) -> AsyncIterator[AsyncEngine]:
    """`open_configured_engine`, refusing (`SchemaBehindError`) unless the schema is at head."""
    async with open_configured_engine(
        cfg, data_dir, synchronous_commit=synchronous_commit
    ) as engine:
        await require_schema_at_head(engine)
        yield engine


@dataclass(frozen=True)
class SchemaState:
    """Where the database's schema stands relative to this syncd's migrations."""

    current: str | None
    head: str

    @property
    def at_head(self) -> bool:
        return self.current == self.head


_VERSION_TABLE = f"{schema.SCHEMA}.alembic_version"


async def schema_state(engine: AsyncEngine) -> SchemaState:
    """The database's current revision (read from Alembic's version table, without
    importing Alembic) and this syncd's head revision, `HEAD_REVISION`."""
    with database_errors("cannot reach the database"):
        async with engine.connect() as connection:
            exists = await connection.scalar(
                sa.text("SELECT to_regclass(:table) IS NOT NULL"), {"table": _VERSION_TABLE}
            )
            revisions: list[str] = []
            if exists:
                query = sa.text(f"SELECT version_num FROM {_VERSION_TABLE}")
                revisions = list(await connection.scalars(query))
    # One row on a linear history; several (branches merged by hand) can never equal head.
    current = ",".join(sorted(revisions)) if revisions else None
    return SchemaState(current=current, head=HEAD_REVISION)


async def require_schema_at_head(engine: AsyncEngine) -> None:
    """Raises `SchemaBehindError` naming `syncd migrate` unless the schema is at head."""
    state = await schema_state(engine)
    if state.current == state.head:
        return
    if state.current is None:
        raise errors.SchemaBehindError(
            "the database has no syncd schema yet: run `syncd migrate` first"
        )
    raise errors.SchemaBehindError(
        f"the database schema is at revision {state.current}, this syncd needs {state.head}: "
        "run `syncd migrate` (if the database is newer, upgrade syncd instead)"
    )


def _upgrade(connection: Connection, revision: str) -> None:
    from alembic import command

    command.upgrade(alembic_config(connection), revision)


def _downgrade(connection: Connection, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(connection), revision)


async def migrate(engine: AsyncEngine, revision: str = "head") -> SchemaState:
    """Upgrades the schema to `revision` (idempotent); returns the state afterwards."""
    with database_errors("migration failed"):
        async with engine.begin() as connection:
            # Two `syncd migrate` at once (two containers starting) must not interleave.
            await connection.execute(sa.text("SELECT pg_advisory_xact_lock(1398361667, 0)"))
            await connection.run_sync(_upgrade, revision)
    return await schema_state(engine)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Downgrades the schema to `revision` (used by tests and by operators rolling back)."""
    async with engine.begin() as connection:
        await connection.run_sync(_downgrade, revision)
