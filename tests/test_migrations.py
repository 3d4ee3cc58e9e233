"""Migrations against a real PostgreSQL: up, down, up again, and models == migrations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from syncd import db, errors, schema

REPO = Path(__file__).resolve().parent.parent


async def _schema_objects(url: str) -> set[str]:
    async with db.open_engine(url, pool_size=1) as engine, engine.connect() as connection:
        rows = await connection.execute(
            sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = 'syncd'")
        )
        return {row[0] for row in rows}


async def test_upgrade_downgrade_upgrade(empty_db_url: str) -> None:
    async with db.open_engine(empty_db_url, pool_size=1) as engine:
        before = await db.schema_state(engine)
        assert before.current is None and not before.at_head
        state = await db.migrate(engine)
        assert state.at_head
        assert set(schema.REPORTING_VIEWS) <= await _schema_objects(empty_db_url)
        await db.downgrade(engine, "base")
        assert (await db.schema_state(engine)).current is None
        assert await _schema_objects(empty_db_url) == {"alembic_version"}
        assert (await db.migrate(engine)).at_head
        # Idempotent: a second upgrade is a no-op.
        assert (await db.migrate(engine)).at_head
        assert set(schema.REPORTING_VIEWS) <= await _schema_objects(empty_db_url)


async def test_schema_check_names_syncd_migrate(empty_db_url: str) -> None:
    async with db.open_engine(empty_db_url, pool_size=1) as engine:
        try:
            await db.require_schema_at_head(engine)
        except errors.SchemaBehindError as exc:
            assert "run `syncd migrate`" in str(exc)
        else:
            raise AssertionError("an empty database must not pass the schema check")
        await db.migrate(engine, "0001")
        try:
            await db.require_schema_at_head(engine)
        except errors.SchemaBehindError as exc:
            assert "at revision 0001" in str(exc) and "syncd migrate" in str(exc)
        else:
            raise AssertionError("a schema behind head must not pass the schema check")
        await db.migrate(engine)
        await db.require_schema_at_head(engine)


def test_alembic_check_models_match_migrations(db_url: str) -> None:
    """`alembic check`: autogenerate finds nothing to add, so models and migrations agree."""
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "check"],
        env={"SYNCD_DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No new upgrade operations detected" in result.stdout + result.stderr


async def _columns(connection: sa.ext.asyncio.AsyncConnection, relation: str) -> list[str]:
    rows = await connection.execute(
        sa.text(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'syncd' AND table_name = :relation ORDER BY ordinal_position"
        ),
        {"relation": relation},
    )
    return [row[0] for row in rows]


async def test_replicas_append_to_sync_runs_and_keep_its_readers(empty_db_url: str) -> None:
    """Upgrading past 0005 appends `replica` to the view (a public contract: never renamed,
    only appended), leaves older runs' replica NULL, and keeps the readers' grants."""
    role = f"syncd_migration_reader_{os.getpid()}"
    async with db.open_engine(empty_db_url, pool_size=1) as engine:
        await db.migrate(engine, "0005")
        async with engine.begin() as connection:
            before = await _columns(connection, "sync_runs")
            await connection.execute(sa.text(f"CREATE ROLE {role}"))
            await connection.execute(sa.text(f"GRANT SELECT ON syncd.sync_runs TO {role}"))
            await connection.execute(sa.text("INSERT INTO syncd.tenants (name) VALUES ('old')"))
            await connection.execute(
                sa.text(
                    "INSERT INTO syncd.runs (tenant_id, started_at, status) "
                    "SELECT id, now(), 'succeeded' FROM syncd.tenants"
                )
            )
        try:
            assert (await db.migrate(engine)).at_head
            async with engine.connect() as connection:
                assert await _columns(connection, "sync_runs") == [*before, "replica"]
                replicas = (
                    await connection.execute(sa.text("SELECT replica FROM syncd.sync_runs"))
                ).all()
                assert replicas == [(None,)]
                still_granted = await connection.scalar(
                    sa.text(f"SELECT has_table_privilege('{role}', 'syncd.sync_runs', 'SELECT')")
                )
                assert still_granted is True
            await db.downgrade(engine, "0005")
            async with engine.connect() as connection:
                assert await _columns(connection, "sync_runs") == before
        finally:
            async with engine.begin() as connection:
                await connection.execute(sa.text(f"DROP OWNED BY {role}"))
                await connection.execute(sa.text(f"DROP ROLE {role}"))


def test_head_revision_constant_is_the_scripts_head() -> None:
    """`db.HEAD_REVISION` spares the schema check an Alembic import; it must never drift."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(db.alembic_config())
    heads = scripts.get_heads()
    assert len(heads) == 1, f"the migration scripts have several heads: {heads}; merge them"
    head = heads[0]
    assert head == db.HEAD_REVISION, (
        f"a migration was added: set HEAD_REVISION = {head!r} in syncd/db.py (it says "
        f"{db.HEAD_REVISION!r}), the revision of the newest script in migrations/versions"
    )


async def test_schema_state_reads_several_version_rows_as_not_at_head(empty_db_url: str) -> None:
    async with db.open_engine(empty_db_url, pool_size=1) as engine:
        await db.migrate(engine)
        async with engine.begin() as connection:
            await connection.execute(
                sa.text("INSERT INTO syncd.alembic_version (version_num) VALUES ('0001')")
            )
        state = await db.schema_state(engine)
        assert not state.at_head and state.current == f"0001,{db.HEAD_REVISION}"


def test_the_schema_check_runs_without_alembic(db_url: str) -> None:
    """`syncd sync`'s start-up: checking the schema must not import Alembic (a third of it)."""
    code = (
        "import asyncio, sys\n"
        "from syncd import db\n"
        "async def check(url):\n"
        "    async with db.open_engine(url, pool_size=1) as engine:\n"
        "        await db.require_schema_at_head(engine)\n"
        f"asyncio.run(check({db_url!r}))\n"
        "print('alembic' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
