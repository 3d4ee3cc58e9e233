"""Small helpers shared by tests: tenants that point at the simulator, database reads."""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import config
from syncd import simulator as sim

# Fast retries so fault tests take milliseconds, not minutes.
FAST_SETTINGS: dict[str, Any] = {
    "backoff_base": "5ms",
    "backoff_max": "20ms",
    "max_retries": 2,
    "request_timeout": "5s",
    "page_size": 50,
    "max_concurrent_pages": 4,
}

SYNC_APPLICATION_NAME = "syncd-under-test"

Identity = tuple[str, str | None, str]


def tenant_for(
    sim_tenant: sim.SimTenant, url: str, *, password: bool = False, **settings: Any
) -> config.Tenant:
    """A config.Tenant that reaches `sim_tenant` on the simulator at `url`."""
    auth: config.ApiKeyAuth | config.PasswordAuth
    if password:
        auth = config.PasswordAuth(sim_tenant.username, SecretStr(sim_tenant.password))
    else:
        auth = config.ApiKeyAuth(SecretStr(sim_tenant.api_key))
    return config.Tenant(
        name=sim_tenant.name,
        url=url,
        auth=auth,
        verify_tls=True,
        ca_file=None,
        settings=config.SyncSettings.model_validate({**FAST_SETTINGS, **settings}),
    )


def expected_pairs(sim_tenant: sim.SimTenant) -> set[Identity]:
    """The distinct pairs the simulator holds for `sim_tenant`."""
    return {
        (item["jobUid"], item.get("uniqueJobUid"), item["linkedJobUid"])
        for item in sim_tenant.items
    }


async def current_pairs(engine: AsyncEngine, tenant: str) -> set[Identity]:
    """Pairs in `syncd.job_links_current` for `tenant`."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            sa.text(
                "SELECT job_uid::text, unique_job_uid::text, linked_job_uid::text "
                "FROM syncd.job_links_current WHERE tenant = :tenant"
            ),
            {"tenant": tenant},
        )
        return {(row[0], row[1], row[2]) for row in rows}


async def fetch_all(engine: AsyncEngine, statement: str, **params: Any) -> list[Any]:
    """Every row of `statement` as tuples."""
    async with engine.connect() as connection:
        return [tuple(row) for row in await connection.execute(sa.text(statement), params)]


async def link_row_writes(engine: AsyncEngine) -> int:
    """Rows inserted, updated or deleted in syncd.links, by PostgreSQL's statistics.

    A backend hands its statistics over when it exits, so callers sync through an engine of
    their own and dispose of it first; this waits until those backends are gone.
    """
    async with engine.connect() as connection:
        for _ in range(200):
            others = await connection.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = :name"
                ),
                {"name": SYNC_APPLICATION_NAME},
            )
            if not others:
                break
            await asyncio.sleep(0.02)
        await connection.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
        value = await connection.scalar(
            sa.text(
                "SELECT n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables "
                "WHERE schemaname = 'syncd' AND relname = 'links'"
            )
        )
        return int(value or 0)
