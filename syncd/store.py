"""All of syncd's SQL: tenants, runs, the staging table and the set-based snapshot diff.

A `RunStore` works on one dedicated connection for the whole of one tenant's run: the
session-level advisory lock, the temporary staging table and the apply transaction all live
on it. Pairs reach the staging table through asyncpg's binary `COPY`, never row by row.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from syncd import errors, models
from syncd.paging import Pair

# Advisory lock namespace ("SYNC"); the second key is the tenant's id.
LOCK_NAMESPACE = 1398361667
STAGING = "syncd_staging"

_NIL = models.NO_UNIQUE_JOB_UID


@dataclass(frozen=True)
class ApplyResult:
    """What applying a snapshot changed, and how many pairs were present before."""

    added: int
    removed: int
    present_before: int


class RunStore:
    """SQL for one run of one tenant, on one connection the caller owns."""

    def __init__(self, connection: AsyncConnection, tenant_name: str) -> None:
        self.connection = connection
        self.tenant_name = tenant_name
        self.tenant_id: int | None = None
        self.run_id: int | None = None
        self.started_at: datetime | None = None
        self._staging_ready = False

    async def _scalar(self, statement: str, **params: Any) -> Any:
        result = await self.connection.execute(sa.text(statement), params)
        return result.scalar_one()

    async def ensure_tenant(self) -> int:
        """The tenant's id, creating its row on first sight."""
        await self.connection.execute(
            sa.text(
                "INSERT INTO syncd.tenants (name) VALUES (:name) ON CONFLICT (name) DO NOTHING"
            ),
            {"name": self.tenant_name},
        )
        tenant_id: int = await self._scalar(
            "SELECT id FROM syncd.tenants WHERE name = :name", name=self.tenant_name
        )
        await self.connection.commit()
        self.tenant_id = tenant_id
        return tenant_id

    async def try_lock(self) -> bool:
        """Takes the tenant's session-level advisory lock; False if another process holds it."""
        locked: bool = await self._scalar(
            "SELECT pg_try_advisory_lock(:namespace, :tenant_id)",
            namespace=LOCK_NAMESPACE,
            tenant_id=self.tenant_id,
        )
        await self.connection.commit()
        return locked

    async def unlock(self) -> None:
        """Releases the advisory lock (closing the connection would release it too)."""
        await self.connection.execute(
            sa.text("SELECT pg_advisory_unlock(:namespace, :tenant_id)"),
            {"namespace": LOCK_NAMESPACE, "tenant_id": self.tenant_id},
        )
        await self.connection.commit()

    async def close_abandoned_runs(self) -> int:
        """Marks `failed` the runs left `running` by a process that died (we hold the lock)."""
        result = await self.connection.execute(
            sa.text(
                "UPDATE syncd.runs SET status = 'failed', finished_at = now(), "
                "error = 'abandoned: the process running it stopped before it finished' "
                "WHERE tenant_id = :tenant_id AND status = 'running'"
            ),
            {"tenant_id": self.tenant_id},
        )
        await self.connection.commit()
        return result.rowcount

    async def start_run(self) -> int:
        """Records a new `running` run; returns its id."""
        row = (
            await self.connection.execute(
                sa.text(
                    "INSERT INTO syncd.runs (tenant_id, started_at, status, host, pid) "
                    "VALUES (:tenant_id, now(), 'running', :host, :pid) "
                    "RETURNING id, started_at"
                ),
                {"tenant_id": self.tenant_id, "host": socket.gethostname(), "pid": os.getpid()},
            )
        ).one()
        await self.connection.commit()
        self.run_id, self.started_at = row[0], row[1]
        return int(row[0])

    async def create_staging(self) -> None:
        """An empty temporary staging table (not WAL-logged, private to this connection).

        The table lives as long as the pooled connection and `clear_staging` empties it after
        each run: creating and dropping it per run would write ~6 kB of catalog WAL each time
        (plus ~13 kB if it were ANALYZEd), where a TRUNCATE writes ~0.5 kB.
        """
        await self.connection.execute(
            sa.text(
                f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING} ("
                "job_uid uuid NOT NULL, unique_job_uid uuid NOT NULL, linked_job_uid uuid NOT NULL)"
            )
        )
        if await self._scalar(f"SELECT EXISTS (SELECT FROM pg_temp.{STAGING})"):
            # A run on this connection ended without clearing it (e.g. the clear failed).
            await self.connection.execute(sa.text(f"TRUNCATE pg_temp.{STAGING}"))
        await self.connection.commit()
        self._staging_ready = True

    async def clear_staging(self) -> None:
        """Empties the staging table (the pooled connection outlives the run)."""
        if self._staging_ready:
            await self.connection.execute(sa.text(f"TRUNCATE pg_temp.{STAGING}"))
            await self.connection.commit()

    async def copy_pairs(self, pairs: Sequence[Pair]) -> None:
        """Appends `pairs` to the staging table with one binary COPY."""
        raw = await self.connection.get_raw_connection()
        driver: Any = raw.driver_connection
        try:
            await driver.copy_records_to_table(
                STAGING,
                records=[(job, unique or _NIL, linked) for job, unique, linked in pairs],
                columns=("job_uid", "unique_job_uid", "linked_job_uid"),
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            # SQLAlchemy wraps the errors of the statements it runs; COPY goes to the driver
            # directly, so its errors are translated here.
            raise errors.DatabaseError(f"COPY into the staging table failed: {exc}") from exc

    async def apply(self, *, remove_absent: bool) -> ApplyResult:
        """Opens intervals for new pairs and, if `remove_absent`, closes absent ones.

        One statement, one snapshot of `links`. A FULL JOIN of the tenant's open pairs with
        the staging table finds both sides of the difference in one hash join (a full join
        cannot degrade into a nested loop, whatever the planner's estimates, and staging
        needs no ANALYZE); only the differing rows are materialized. New pairs are inserted
        in the order of `uq_links_open_pair`, so its pages fill sequentially. The caller
        owns the transaction.
        """
        # A big tenant's diff costs enough to trigger JIT compilation, which only adds
        # time to a statement of hash joins and plain comparisons.
        await self.connection.execute(sa.text("SET LOCAL jit = off"))
        row = (
            await self.connection.execute(
                sa.text(
                    f"""
                    WITH diff AS MATERIALIZED (
                        SELECT o.id AS link_id, s.job_uid, s.linked_job_uid, s.unique_job_uid
                          FROM (SELECT id, job_uid, linked_job_uid, unique_job_uid
                                  FROM syncd.links
                                 WHERE tenant_id = :tenant_id AND valid_to IS NULL) o
                          FULL JOIN {STAGING} s
                            ON s.job_uid = o.job_uid
                           AND s.linked_job_uid = o.linked_job_uid
                           AND s.unique_job_uid = o.unique_job_uid
                         WHERE o.id IS NULL OR s.job_uid IS NULL
                    ), closed AS (
                        UPDATE syncd.links l
                           SET valid_to = :started_at, closed_run_id = :run_id
                          FROM diff d
                         WHERE :remove_absent AND d.job_uid IS NULL AND l.id = d.link_id
                        RETURNING 1
                    ), added AS (
                        INSERT INTO syncd.links (tenant_id, job_uid, linked_job_uid,
                                                 unique_job_uid, valid_from, opened_run_id)
                        SELECT CAST(:tenant_id AS integer), d.job_uid, d.linked_job_uid,
                               d.unique_job_uid, CAST(:started_at AS timestamptz),
                               CAST(:run_id AS bigint)
                          FROM diff d
                         WHERE d.link_id IS NULL
                         GROUP BY d.job_uid, d.linked_job_uid, d.unique_job_uid
                         ORDER BY d.job_uid, d.linked_job_uid, d.unique_job_uid
                        RETURNING 1
                    )
                    SELECT (SELECT count(*) FROM added),
                           (SELECT count(*) FROM closed),
                           (SELECT count(*) FROM syncd.links
                             WHERE tenant_id = :tenant_id AND valid_to IS NULL)
                    """
                ),
                {
                    "tenant_id": self.tenant_id,
                    "run_id": self.run_id,
                    "started_at": self.started_at,
                    "remove_absent": remove_absent,
                },
            )
        ).one()
        return ApplyResult(added=int(row[0]), removed=int(row[1]), present_before=int(row[2]))

    async def distinct_staged(self) -> int:
        """How many distinct pairs the staging table holds."""
        count: int = await self._scalar(
            f"SELECT count(*) FROM (SELECT DISTINCT * FROM {STAGING}) d"
        )
        return count

    async def finish_run(
        self,
        *,
        status: str,
        pages_fetched: int,
        pairs_seen: int,
        added: int,
        removed: int,
        error: str | None,
        confirmed: bool,
        current_pairs: int,
    ) -> None:
        """Closes the run and updates the tenant's bookkeeping.

        Runs inside the caller's transaction, so data and run status commit together.
        """
        await self.connection.execute(
            sa.text(
                """
                UPDATE syncd.tenants
                   SET current_pairs = :current_pairs,
                       confirmed_run_id = CASE WHEN :confirmed THEN :run_id
                                               ELSE confirmed_run_id END,
                       confirmed_at = CASE WHEN :confirmed THEN :started_at ELSE confirmed_at END
                 WHERE id = :tenant_id
                """
            ),
            {
                "current_pairs": current_pairs,
                "confirmed": confirmed,
                "run_id": self.run_id,
                "started_at": self.started_at,
                "tenant_id": self.tenant_id,
            },
        )
        await self.connection.execute(
            sa.text(
                "UPDATE syncd.runs SET status = :status, finished_at = now(), "
                "pages_fetched = :pages_fetched, pairs_seen = :pairs_seen, "
                "pairs_added = :added, pairs_removed = :removed, error = :error "
                "WHERE id = :run_id"
            ),
            {
                "status": status,
                "pages_fetched": pages_fetched,
                "pairs_seen": pairs_seen,
                "added": added,
                "removed": removed,
                "error": error,
                "run_id": self.run_id,
            },
        )


async def fail_run(
    connection: AsyncConnection, run_id: int, error: str, pages_fetched: int
) -> None:
    """Marks a run `failed` with `error`, in a transaction of its own."""
    await connection.execute(
        sa.text(
            "UPDATE syncd.runs SET status = 'failed', finished_at = now(), error = :error, "
            "pages_fetched = :pages_fetched WHERE id = :run_id AND status = 'running'"
        ),
        {"error": error, "pages_fetched": pages_fetched, "run_id": run_id},
    )
    await connection.commit()


@dataclass(frozen=True)
class StoredTenantStatus:
    """A row of `syncd.tenant_status`, and the database's clock when it was read."""

    tenant: str
    last_run_at: datetime | None
    last_status: str | None
    last_success_at: datetime | None
    current_pairs: int
    read_at: datetime


async def read_tenant_status(engine: AsyncEngine) -> list[StoredTenantStatus]:
    """Every tenant the database holds, by name; `errors.DatabaseError` if unreadable."""
    try:
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    sa.text(
                        "SELECT tenant, last_run_at, last_status, last_success_at, "
                        "current_pairs, now() FROM syncd.tenant_status ORDER BY tenant"
                    )
                )
            ).all()
    except (OSError, sa.exc.DBAPIError) as exc:
        raise errors.DatabaseError(f"cannot read syncd.tenant_status: {exc}") from exc
    return [
        StoredTenantStatus(
            tenant=row[0],
            last_run_at=row[1],
            last_status=row[2],
            last_success_at=row[3],
            current_pairs=int(row[4]),
            read_at=row[5],
        )
        for row in rows
    ]
