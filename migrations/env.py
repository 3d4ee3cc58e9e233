"""Alembic environment (async template).

syncd passes in a connection it already holds (`config.attributes["connection"]`); run by
hand, alembic connects to `sqlalchemy.url` or `$SYNCD_DATABASE_URL`.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from syncd import models
from syncd.config import normalize_database_url
from syncd.schema import SCHEMA

config = context.config
target_metadata = models.metadata


def include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    # Only syncd's own schema is ours to compare.
    schema = getattr(obj, "schema", None)
    return type_ != "table" or schema == SCHEMA


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_schemas=True,
        include_object=include_object,
        version_table_schema=SCHEMA,
        compare_type=True,
    )
    connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("SYNCD_DATABASE_URL")
    if not url:
        raise SystemExit("set SYNCD_DATABASE_URL (or sqlalchemy.url) to run alembic by hand")
    engine = create_async_engine(normalize_database_url(url))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
    else:
        asyncio.run(run_async_migrations())


if context.is_offline_mode():
    raise SystemExit("syncd's migrations run online only")
run_migrations_online()
