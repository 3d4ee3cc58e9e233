"""Database plumbing: the engine (one per process), migrations, and the schema check.

The engine is owned by `open_engine` / `open_database`, async context managers that dispose
of it on exit; everything else receives it as an argument.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
import structlog
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import syncd
from syncd import config, errors, models

log = structlog.get_logger(__name__)


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
    alembic_cfg = AlembicConfig()
    alembic_cfg.set_main_option("script_location", str(migrations_path()))
    if connection is not None:
        alembic_cfg.attributes["connection"] = connection
    return alembic_cfg


def safe_url(url: str) -> str:
    """`url` with its password masked, fit for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparseable database url>"


@contextlib.asynccontextmanager
async def open_engine(
    url: str,
    *,
    pool_size: int = 5,
    statement_timeout_s: float = 600.0,
    connect_timeout_s: float = 10.0,
    application_name: str = "syncd",
) -> AsyncIterator[AsyncEngine]:
    """An async engine for `url` (any `postgresql://` form), disposed of on exit."""
    engine = create_async_engine(
        config.normalize_database_url(url),
        pool_size=pool_size,
        max_overflow=2,
        pool_pre_ping=True,
        pool_recycle=3600,
        connect_args={
            "timeout": connect_timeout_s,
            "server_settings": {
                "application_name": application_name,
                # At least 1 ms: PostgreSQL reads 0 as "no timeout at all".
                "statement_timeout": str(max(1, round(statement_timeout_s * 1000))),
            },
        },
    )
    try:
        yield engine
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class SchemaState:
    """Where the database's schema stands relative to this syncd's migrations."""

    current: str | None
    head: str

    @property
    def at_head(self) -> bool:
        return self.current == self.head


def _current_revision(connection: Connection) -> str | None:
    # Alembic builds a new Table for its version table on every call: cached, each check
    # (every 15 s in the daemon) would keep one more compiled statement (~17 kB) alive.
    connection = connection.execution_options(compiled_cache=None)
    context = MigrationContext.configure(connection, opts={"version_table_schema": models.SCHEMA})
    return context.get_current_revision()


async def schema_state(engine: AsyncEngine) -> SchemaState:
    """The database's current revision and this syncd's head revision."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "syncd ships at least one migration"
    try:
        async with engine.connect() as connection:
            current = await connection.run_sync(_current_revision)
    except (OSError, sa.exc.DBAPIError) as exc:
        raise errors.DatabaseError(f"cannot reach the database: {exc}") from exc
    return SchemaState(current=current, head=head)


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
    try:
        async with engine.begin() as connection:
            # Two `syncd migrate` at once (two containers starting) must not interleave.
            await connection.execute(sa.text("SELECT pg_advisory_xact_lock(1398361667, 0)"))
            await connection.run_sync(_upgrade, revision)
    except (OSError, sa.exc.DBAPIError) as exc:
        raise errors.DatabaseError(f"migration failed: {exc}") from exc
    return await schema_state(engine)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Downgrades the schema to `revision` (used by tests and by operators rolling back)."""
    async with engine.begin() as connection:
        await connection.run_sync(_downgrade, revision)
