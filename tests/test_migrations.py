"""Migrations against a real PostgreSQL: up, down, up again, and models == migrations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from syncd import db, errors, models

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
        assert set(models.REPORTING_VIEWS) <= await _schema_objects(empty_db_url)
        await db.downgrade(engine, "base")
        assert (await db.schema_state(engine)).current is None
        assert await _schema_objects(empty_db_url) == {"alembic_version"}
        assert (await db.migrate(engine)).at_head
        # Idempotent: a second upgrade is a no-op.
        assert (await db.migrate(engine)).at_head
        assert set(models.REPORTING_VIEWS) <= await _schema_objects(empty_db_url)


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
