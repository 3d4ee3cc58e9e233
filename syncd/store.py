"""All of syncd's SQL: tenants, runs, the staging tables and the set-based snapshot diffs.

Plain functions over a connection the caller owns: values go in and come out (a `Run`,
an `ApplyResult`), nothing is remembered between calls, and nothing here commits. The
sync engine (`sync.py`) owns every transaction. Pairs and catalog records reach their
staging tables through asyncpg's binary `COPY`, never row by row; the diffs are set-based
whatever the size: one statement per copy mode of links, two for all catalog collections
together.
Driver errors are recognised in one place, `db.is_database_error`, and turned into
`errors.DatabaseError` by `db.database_errors`.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from syncd import collections, db, errors, status
from syncd.paging import UUID_BYTES, PairBlock, Record, SnapshotKey
from syncd.status import RunStatus

# Advisory lock namespace ("SYNC"); the second key is the tenant's id.
LOCK_NAMESPACE = 1398361667
STAGING = "syncd_staging"
CATALOG_STAGING = "syncd_catalog_staging"
# One staging table of pairs per copy mode, all of the shape the periodic one always had:
# the million-pair path stages and joins exactly as before (no mode column to copy or
# filter on).
PAIR_STAGING: dict[str, str] = {
    mode: STAGING if mode == collections.CopyMode.PERIODIC else f"{STAGING}_{mode}"
    for mode in collections.CopyMode
}

# Binary COPY (PostgreSQL's documented format): a signature, flags and an extension length
# up front, a -1 field count at the end; each pair row is 3 fields of 16 bytes.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"
_UUID_FIELD = UUID_BYTES.to_bytes(4, "big") + bytes(UUID_BYTES)
_PAIR_ROW = (3).to_bytes(2, "big") + _UUID_FIELD * 3
# Where each field's 16 bytes start within a row: after the 2-byte field count, then after
# each 4-byte length and the fields before.
_PAIR_FIELD_STARTS = tuple(2 + 4 * (n + 1) + UUID_BYTES * n for n in range(3))


@dataclass(frozen=True)
class ConfirmedSnapshot:
    """A collection's last complete, fully applied snapshot (`syncd.confirmed_snapshots`)."""

    key: SnapshotKey
    items: int  # items stored once it was applied


@dataclass(frozen=True)
class Run:
    """One run of one tenant, as recorded when it started."""

    id: int
    tenant_id: int
    tenant: str
    started_at: datetime
    # The collections the tenant's previous run found unavailable (so a change is logged once).
    unavailable_before: tuple[str, ...] = ()
    # Each collection's confirmed snapshot, by name, as the run started.
    confirmed: Mapping[str, ConfirmedSnapshot] = field(default_factory=dict)
    # Runs of the tenant left `running` by a stopped process, closed as this one started.
    abandoned: int = 0


@dataclass(frozen=True)
class ApplyResult:
    """What applying a snapshot changed, and how many items were present before."""

    added: int
    removed: int
    present_before: int

    changed: int = 0  # catalog items with a new version (descriptive fields changed)
    refreshed: int = 0  # catalog items whose volatile fields alone changed

    @property
    def present_after(self) -> int:
        """Items present once the apply commits."""
        return self.present_before + self.added - self.removed


@functools.lru_cache(maxsize=256)
def _sql(statement: str) -> sa.TextClause:
    """`sa.text(statement)`, built once per statement: each build parses the text for
    bind parameters, and a small tenant's run is mostly these statements."""
    return sa.text(statement)


async def _scalar(connection: AsyncConnection, statement: str, **params: Any) -> Any:
    result = await connection.execute(_sql(statement), params)
    return result.scalar_one()


async def ensure_tenant(connection: AsyncConnection, name: str) -> int:
    """The tenant's id, creating its row on first sight."""
    await connection.execute(
        _sql("INSERT INTO syncd.tenants (name) VALUES (:name) ON CONFLICT (name) DO NOTHING"),
        {"name": name},
    )
    tenant_id: int = await _scalar(
        connection, "SELECT id FROM syncd.tenants WHERE name = :name", name=name
    )
    return tenant_id


_LOCK = "SELECT id, pg_try_advisory_lock($1, id) FROM syncd.tenants WHERE name = $2"


async def lock_tenant(connection: AsyncConnection, name: str) -> tuple[int, bool]:
    """The tenant's id (its row created on first sight) and whether its session-level
    advisory lock was taken (False: another process holds it).

    Outside any transaction, on the driver's connection: a session lock needs none, and
    a run's first round trip is then just this one statement.
    """
    driver = await _driver(connection)
    row = await driver.fetchrow(_LOCK, LOCK_NAMESPACE, name)
    if row is None:
        await driver.execute(
            "INSERT INTO syncd.tenants (name) VALUES ($1) ON CONFLICT (name) DO NOTHING", name
        )
        row = await driver.fetchrow(_LOCK, LOCK_NAMESPACE, name)
    if row is None:  # deleted between the insert and the lookup
        raise errors.DatabaseError(f"tenant {name!r} vanished from syncd.tenants; try again")
    return int(row[0]), bool(row[1])


async def unlock(connection: AsyncConnection, tenant_id: int) -> None:
    """Releases the advisory lock (closing the connection would release it too); outside
    any transaction, after the run's last commit."""
    driver = await _driver(connection)
    await driver.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_NAMESPACE, tenant_id)


async def _driver(connection: AsyncConnection) -> Any:
    """The asyncpg connection under `connection` (for COPY and statements outside
    transactions)."""
    raw = await connection.get_raw_connection()
    return raw.driver_connection


# Every statement that ends a run is `WITH ended AS (UPDATE syncd.runs ... RETURNING
# <_ENDED>)` followed by this upsert: the rollup commits with the run's status, in the same
# round trip. Grouped, because one statement may end several runs of one hour (abandoned
# ones), and ON CONFLICT may touch a row only once. The hour is binned from the epoch, as in
# the migration that created the table.
_ENDED = "tenant_id, status, started_at, finished_at, pairs_added, pairs_removed"
_ADD_TO_RUN_HOURS = """
    INSERT INTO syncd.run_hours AS h (hour, tenant_id, status, runs, runs_timed,
                                      duration_sum_s, duration_max_s, pairs_added,
                                      pairs_removed)
    SELECT date_bin('1 hour', started_at, TIMESTAMPTZ '1970-01-01 00:00:00+00'),
           tenant_id,
           status,
           count(*),
           count(finished_at),
           coalesce(sum(date_part('epoch', finished_at - started_at)), 0),
           max(date_part('epoch', finished_at - started_at)),
           coalesce(sum(pairs_added), 0),
           coalesce(sum(pairs_removed), 0)
      FROM {source}
     GROUP BY 1, 2, 3 {order}
        ON CONFLICT (hour, tenant_id, status) DO UPDATE
       SET runs = h.runs + excluded.runs,
           runs_timed = h.runs_timed + excluded.runs_timed,
           duration_sum_s = h.duration_sum_s + excluded.duration_sum_s,
           duration_max_s = greatest(h.duration_max_s, excluded.duration_max_s),
           pairs_added = h.pairs_added + excluded.pairs_added,
           pairs_removed = h.pairs_removed + excluded.pairs_removed
"""


def _ending(update: str) -> str:
    """`update` (of syncd.runs, to a finished status) and the rollup's upsert of the runs it
    ended, as one statement."""
    return (
        f"WITH ended AS ({update} RETURNING {_ENDED}), "
        f"rolled_up AS ({_ADD_TO_RUN_HOURS.format(source='ended', order='')}) "
        "SELECT count(*) FROM ended"
    )


async def rebuild_run_hours(connection: AsyncConnection) -> None:
    """Recomputes the hourly rollup from `syncd.runs`, as the migration that created it did:
    for runs recorded past this module (imports, seeds, benchmarks). The caller commits."""
    await connection.execute(_sql("DELETE FROM syncd.run_hours"))
    # A year of runs makes millions of groups: room to hash them in memory, for this
    # transaction only.
    await connection.execute(_sql("SET LOCAL work_mem = '256MB'"))
    # Sorted into the key's order, as the migration's backfill: see there why.
    await connection.execute(
        _sql(
            _ADD_TO_RUN_HOURS.format(
                source=f"(SELECT {_ENDED} FROM syncd.runs WHERE status <> 'running') runs",
                order="ORDER BY 1, 2, 3",
            )
        )
    )


async def start_run(connection: AsyncConnection, tenant_id: int, tenant: str, replica: str) -> Run:
    """Records a new `running` run of `replica` (this process's `[daemon] replica_name`),
    marks `failed` the runs of the tenant left `running` by a process that died (the caller
    holds the tenant's lock, so none of them is alive), and reads what the run needs to
    know of the tenant's past: one statement.

    The confirmed snapshots come back as JSON, not as an array of rows: the driver would
    look up an anonymous row type's layout on every new connection (up to three round trips,
    one of them a costly catalog query), and `syncd sync` opens its connections as it starts."""
    row = (
        await connection.execute(
            _sql(
                f"""
                WITH abandoned AS (
                    UPDATE syncd.runs SET status = :failed, finished_at = now(),
                           error = 'abandoned: the process running it stopped before it '
                                   'finished'
                     WHERE tenant_id = :tenant_id AND status = :running
                    RETURNING {_ENDED}
                ), rolled_up AS ({_ADD_TO_RUN_HOURS.format(source="abandoned", order="")}
                ), run AS (
                    INSERT INTO syncd.runs (tenant_id, started_at, status, host, pid, replica)
                    VALUES (:tenant_id, now(), :running, :host, :pid, :replica)
                    RETURNING id, started_at
                )
                SELECT run.id, run.started_at,
                       (SELECT unavailable_collections FROM syncd.tenants
                         WHERE id = :tenant_id),
                       (SELECT jsonb_agg(jsonb_build_array(collection, total, page_size,
                                                           items, encode(digests, 'hex')))
                          FROM syncd.confirmed_snapshots WHERE tenant_id = :tenant_id),
                       (SELECT count(*) FROM abandoned)
                  FROM run
                """
            ),
            {
                "tenant_id": tenant_id,
                "running": RunStatus.RUNNING,
                "failed": RunStatus.FAILED,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "replica": replica,
            },
        )
    ).one()
    return Run(
        id=int(row[0]),
        tenant_id=tenant_id,
        tenant=tenant,
        started_at=row[1],
        unavailable_before=tuple(row[2] or ()),
        confirmed={
            name: ConfirmedSnapshot(SnapshotKey(total, page_size, bytes.fromhex(digests)), items)
            for name, total, page_size, items, digests in row[3] or ()
        },
        abandoned=int(row[4]),
    )


async def prepare_staging(connection: AsyncConnection) -> None:
    """Readies the temporary staging tables (not WAL-logged, private to this connection):
    one for the pairs of each copy mode, one for catalog records of every collection.

    They live as long as the pooled connection and hold rows only until the end of the
    transaction (ON COMMIT DELETE ROWS; a rollback discards its rows too), so a run needs
    no statement to empty them and never finds an earlier run's rows. Creating and dropping
    them per run would write ~6 kB of catalog WAL each time; emptying them at commit
    truncates in place and writes none.
    """
    pair_tables = " ".join(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {table} (job_uid uuid NOT NULL, "
        "unique_job_uid uuid NOT NULL, linked_job_uid uuid NOT NULL) ON COMMIT DELETE ROWS;"
        for table in PAIR_STAGING.values()
    )
    # One round trip for all (a run of a small tenant is mostly round trips).
    await connection.execute(
        _sql(
            f"DO $$ BEGIN {pair_tables} "
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {CATALOG_STAGING} ("
            "collection text NOT NULL, uid uuid NOT NULL, attributes jsonb NOT NULL, "
            "volatile jsonb NOT NULL) ON COMMIT DELETE ROWS; END $$"
        )
    )


def pair_copy_data(blocks: Sequence[PairBlock]) -> bytes:
    """`blocks` as one binary COPY stream of (job_uid, unique_job_uid, linked_job_uid) rows.

    Built field-wise, not row by row: a template of constant rows, then each of the 16
    byte positions of each field written into every row with one strided slice assignment.
    """
    count = sum(block.count for block in blocks)
    rows = bytearray(_PAIR_ROW * count)
    row_size = len(_PAIR_ROW)
    fields = [b"".join(block.jobs for block in blocks)]
    fields.append(b"".join(block.uniques for block in blocks))
    fields.append(b"".join(block.links for block in blocks))
    for start, packed in zip(_PAIR_FIELD_STARTS, fields, strict=True):
        for byte in range(UUID_BYTES):
            rows[start + byte :: row_size] = packed[byte::UUID_BYTES]
    return _COPY_HEADER + rows + _COPY_TRAILER


async def copy_pairs(
    connection: AsyncConnection, copy_mode: str, blocks: Sequence[PairBlock]
) -> None:
    """Appends the pairs of `blocks` to `copy_mode`'s staging table with one binary COPY."""
    data = pair_copy_data(blocks)

    async def source() -> AsyncIterator[bytes]:
        yield data

    driver = await _driver(connection)
    await driver.copy_to_table(
        PAIR_STAGING[copy_mode],
        source=source(),
        columns=("job_uid", "unique_job_uid", "linked_job_uid"),
        format="binary",
    )


async def copy_records(
    connection: AsyncConnection, collection: str, records: Sequence[Record]
) -> None:
    """Appends catalog `records` of `collection` to the catalog staging table (binary COPY)."""
    driver = await _driver(connection)
    await driver.copy_records_to_table(
        CATALOG_STAGING,
        records=[(collection, r.uid, r.attributes, r.volatile) for r in records],
        columns=("collection", "uid", "attributes", "volatile"),
    )


async def prepare_apply(connection: AsyncConnection) -> None:
    """Readies the transaction for the diffs (once, before them and before any savepoint).

    - `syncd.applying`: the writes to `links` and `catalog_items` are the apply's own, which
      records the snapshots it confirms in this transaction; any other write makes the
      database forget every confirmed snapshot (migration 0007's triggers).
    - JIT off: a big tenant's diff costs enough to trigger JIT compilation, which only adds
      time to statements of hash joins and plain comparisons.

    Whether its commit waits for the WAL flush is the engine's choice (`db.open_engine`'s
    `synchronous_commit`), as for the run's other commits.
    """
    await connection.execute(
        _sql("SELECT set_config('syncd.applying', 'on', true), set_config('jit', 'off', true)")
    )


async def apply_snapshot(
    connection: AsyncConnection,
    run: Run,
    *,
    remove_absent: bool,
    copy_mode: str = collections.CopyMode.PERIODIC,
) -> ApplyResult:
    """Opens intervals for new pairs of `copy_mode` and, if `remove_absent`, closes absent
    ones.

    One statement, one snapshot of `links`. A FULL JOIN of the tenant's open pairs of that
    mode with the staged ones finds both sides of the difference in one hash join (a full
    join cannot degrade into a nested loop, whatever the planner's estimates, and staging
    needs no ANALYZE); only the differing rows are materialized. New pairs are inserted in
    the order of `uq_links_open_pair`, so its pages fill sequentially. Run
    `prepare_apply` first.
    """
    row = (
        await connection.execute(
            _sql(
                f"""
                WITH diff AS MATERIALIZED (
                    SELECT o.id AS link_id, s.job_uid, s.linked_job_uid, s.unique_job_uid
                      FROM (SELECT id, job_uid, linked_job_uid, unique_job_uid
                              FROM syncd.links
                             WHERE tenant_id = :tenant_id AND copy_mode = :copy_mode
                               AND valid_to IS NULL) o
                      FULL JOIN {PAIR_STAGING[copy_mode]} s
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
                    INSERT INTO syncd.links (tenant_id, copy_mode, job_uid, linked_job_uid,
                                             unique_job_uid, valid_from, opened_run_id)
                    SELECT CAST(:tenant_id AS integer), CAST(:copy_mode AS text), d.job_uid,
                           d.linked_job_uid, d.unique_job_uid, CAST(:started_at AS timestamptz),
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
                         WHERE tenant_id = :tenant_id AND copy_mode = :copy_mode
                           AND valid_to IS NULL)
                """
            ),
            {
                "tenant_id": run.tenant_id,
                "run_id": run.id,
                "started_at": run.started_at,
                "remove_absent": remove_absent,
                "copy_mode": str(copy_mode),
            },
        )
    ).one()
    return ApplyResult(added=int(row[0]), removed=int(row[1]), present_before=int(row[2]))


async def open_links(connection: AsyncConnection, tenant_id: int, copy_mode: str) -> int:
    """How many pairs of `copy_mode` the tenant has now (for a mode not applied this run)."""
    count: int = await _scalar(
        connection,
        "SELECT count(*) FROM syncd.links "
        "WHERE tenant_id = :tenant_id AND copy_mode = :copy_mode AND valid_to IS NULL",
        tenant_id=tenant_id,
        copy_mode=copy_mode,
    )
    return count


# The staged records of the collections asked for, one per uid (pages overlap by one item,
# and a server may list an item twice: the same one wins every run, so no version flaps).
_STAGED_RECORDS = f"""
    SELECT DISTINCT ON (collection, uid) collection, uid, attributes, volatile
      FROM {CATALOG_STAGING}
     WHERE collection = ANY(:collections)
     ORDER BY collection, uid, attributes, volatile
"""


async def apply_catalog_closes(
    connection: AsyncConnection,
    run: Run,
    collections: Sequence[str],
    *,
    removable: Sequence[str],
) -> dict[str, ApplyResult]:
    """First half of the catalog diff, for every one of `collections` in one statement:
    closes the current version of items whose descriptive fields changed and, for the
    `removable` collections, of items absent from the snapshot; updates `volatile` in place
    where only volatile fields changed. Per collection, `added` is left 0
    (`apply_catalog_opens` inserts). A no-op writes nothing.

    Closing and opening are two statements: a new open version inserted in the statement
    that closes the old one would collide with it in `uq_catalog_items_open_item`, which
    every statement checks against the table as it was when the statement began. Run
    `prepare_apply` first.
    """
    rows = (
        await connection.execute(
            _sql(
                f"""
                WITH diff AS MATERIALIZED (
                    SELECT o.id, o.collection AS stored_in, o.attributes AS old_attributes,
                           o.volatile AS old_volatile, s.uid, s.attributes, s.volatile
                      FROM (SELECT id, collection, uid, attributes, volatile
                              FROM syncd.catalog_items
                             WHERE tenant_id = :tenant_id AND collection = ANY(:collections)
                               AND valid_to IS NULL) o
                      FULL JOIN ({_STAGED_RECORDS}) s
                        ON s.collection = o.collection AND s.uid = o.uid
                     WHERE o.id IS NULL OR s.uid IS NULL
                        OR o.attributes IS DISTINCT FROM s.attributes
                        OR o.volatile IS DISTINCT FROM s.volatile
                ), closed AS (
                    UPDATE syncd.catalog_items c
                       SET valid_to = :started_at, closed_run_id = :run_id
                      FROM diff d
                     WHERE c.id = d.id
                       AND ((d.uid IS NULL AND d.stored_in = ANY(:removable))
                            OR (d.uid IS NOT NULL AND d.old_attributes <> d.attributes))
                    RETURNING c.collection, d.uid IS NULL AS removed
                ), refreshed AS (
                    UPDATE syncd.catalog_items c
                       SET volatile = d.volatile
                      FROM diff d
                     WHERE c.id = d.id AND d.uid IS NOT NULL
                       AND d.old_attributes = d.attributes AND d.old_volatile <> d.volatile
                    RETURNING c.collection
                ), present AS (
                    SELECT collection, count(*) AS items
                      FROM syncd.catalog_items
                     WHERE tenant_id = :tenant_id AND collection = ANY(:collections)
                       AND valid_to IS NULL
                     GROUP BY collection
                )
                SELECT name,
                       (SELECT count(*) FROM closed WHERE collection = name AND removed),
                       (SELECT count(*) FROM closed WHERE collection = name AND NOT removed),
                       (SELECT count(*) FROM refreshed WHERE collection = name),
                       coalesce((SELECT items FROM present WHERE collection = name), 0)
                  FROM unnest(CAST(:collections AS text[])) AS name
                """
            ),
            {
                "tenant_id": run.tenant_id,
                "collections": list(collections),
                "removable": list(removable),
                "run_id": run.id,
                "started_at": run.started_at,
            },
        )
    ).all()
    return {
        str(row[0]): ApplyResult(
            added=0,
            removed=int(row[1]),
            changed=int(row[2]),
            refreshed=int(row[3]),
            present_before=int(row[4]),
        )
        for row in rows
    }


async def apply_catalog_opens(
    connection: AsyncConnection, run: Run, collections: Sequence[str]
) -> dict[str, int]:
    """Second half of the catalog diff: inserts a current version for every staged item of
    `collections` that has none (new items, and the next version of those
    `apply_catalog_closes` just closed, which keep their `first_seen_at`). Returns the rows
    inserted, per collection."""
    rows = (
        await connection.execute(
            _sql(
                f"""
                WITH added AS (
                    INSERT INTO syncd.catalog_items (tenant_id, collection, uid, attributes,
                                                     volatile, first_seen_at, valid_from,
                                                     opened_run_id)
                    SELECT CAST(:tenant_id AS integer), s.collection, s.uid, s.attributes,
                           s.volatile,
                           coalesce(previous.first_seen_at, CAST(:started_at AS timestamptz)),
                           CAST(:started_at AS timestamptz), CAST(:run_id AS bigint)
                      FROM ({_STAGED_RECORDS}) s
                      LEFT JOIN syncd.catalog_items previous
                             ON previous.tenant_id = :tenant_id
                            AND previous.collection = s.collection AND previous.uid = s.uid
                            AND previous.closed_run_id = :run_id
                     WHERE NOT EXISTS (
                            SELECT FROM syncd.catalog_items o
                             WHERE o.tenant_id = :tenant_id AND o.collection = s.collection
                               AND o.uid = s.uid AND o.valid_to IS NULL)
                     ORDER BY s.collection, s.uid
                    RETURNING collection
                )
                SELECT name, (SELECT count(*) FROM added WHERE collection = name)
                  FROM unnest(CAST(:collections AS text[])) AS name
                """
            ),
            {
                "tenant_id": run.tenant_id,
                "collections": list(collections),
                "run_id": run.id,
                "started_at": run.started_at,
            },
        )
    ).all()
    return {str(row[0]): int(row[1]) for row in rows}


async def distinct_staged(connection: AsyncConnection, collection: collections.Collection) -> int:
    """How many distinct items of `collection` the staging tables hold."""
    count: int
    if collection.copy_mode is not None:
        count = await _scalar(
            connection,
            "SELECT count(*) FROM (SELECT DISTINCT job_uid, unique_job_uid, linked_job_uid "
            f"FROM {PAIR_STAGING[collection.copy_mode]}) d",
        )
    else:
        count = await _scalar(
            connection,
            f"SELECT count(DISTINCT uid) FROM {CATALOG_STAGING} WHERE collection = :name",
            name=collection.name,
        )
    return count


async def delete_baseline(
    connection: AsyncConnection,
    run: Run,
    window_s: float,
    collection: str = collections.BACKUP_COPY_JOB_OBJECTS.name,
) -> int:
    """The most items of `collection` a run of the tenant confirmed (the collection
    succeeded) within `window_s` before `run`.

    Runs before the tenant's `delete_baseline_since` (an allowed mass delete) are left out.
    Runs from before syncd kept several collections (no `collections`) count for the
    periodic links, the only collection they read. 0 when there is none.
    """
    baseline: int = await _scalar(
        connection,
        """
        SELECT coalesce(max(CASE
                   WHEN r.collections IS NULL THEN r.pairs_seen
                   ELSE (r.collections -> CAST(:collection AS text) ->> 'seen')::bigint END), 0)
          FROM syncd.runs r
          JOIN syncd.tenants t ON t.id = r.tenant_id
         WHERE r.tenant_id = :tenant_id
           AND r.started_at >= CAST(:started_at AS timestamptz) - make_interval(secs => :window_s)
           AND r.started_at >= coalesce(t.delete_baseline_since, '-infinity')
           AND CASE WHEN r.collections IS NULL
                    THEN :legacy AND r.status = :succeeded
                    ELSE r.collections -> CAST(:collection AS text) ->> 'status' = :succeeded
               END
        """,
        tenant_id=run.tenant_id,
        succeeded=RunStatus.SUCCEEDED,
        started_at=run.started_at,
        window_s=window_s,
        collection=collection,
        legacy=collection == collections.BACKUP_COPY_JOB_OBJECTS.name,
    )
    return baseline


@dataclass(frozen=True)
class RunTotals:
    """What a finished run records in its row (and its tenant's)."""

    status: RunStatus
    pages_fetched: int
    pairs_seen: int
    added: int
    removed: int
    error: str | None
    # Pairs of both modes stored now; None leaves the tenant's count as it is (nothing
    # applied).
    current_pairs: int | None
    # Each collection's outcome, by name (`sync_runs.collections`).
    collections: Mapping[str, Mapping[str, object]]
    # Every link collection the tenant has pairs of was complete and applied: the
    # tenant's pairs are confirmed as of this run.
    confirmed: bool
    unavailable: Sequence[str] = ()


async def finish_run(
    connection: AsyncConnection, run: Run, totals: RunTotals, *, reset_baseline: bool = False
) -> None:
    """Closes the run and updates the tenant's bookkeeping, in the caller's transaction (so
    data and run status commit together): the tenant's and the run's rows and an upsert of
    the run's hour in `syncd.run_hours`, in one statement, whatever the collection count.
    `reset_baseline` starts the mass-delete guard's baseline afresh at this run."""
    await connection.execute(
        _sql(
            f"""
            WITH tenant AS (
                UPDATE syncd.tenants
                   SET current_pairs = coalesce(:current_pairs, current_pairs),
                       confirmed_run_id = CASE WHEN :confirmed THEN :run_id
                                               ELSE confirmed_run_id END,
                       confirmed_at = CASE WHEN :confirmed THEN :started_at
                                           ELSE confirmed_at END,
                       delete_baseline_since = CASE WHEN :reset_baseline THEN :started_at
                                                    ELSE delete_baseline_since END,
                       unavailable_collections = CAST(:unavailable AS text[])
                 WHERE id = :tenant_id
            ), ended AS (
                UPDATE syncd.runs
                   SET status = :status, finished_at = now(), pages_fetched = :pages_fetched,
                       pairs_seen = :pairs_seen, pairs_added = :added,
                       pairs_removed = :removed, error = :error,
                       collections = CAST(:collections AS jsonb)
                 WHERE id = :run_id
                RETURNING {_ENDED}
            ), rolled_up AS ({_ADD_TO_RUN_HOURS.format(source="ended", order="")}
            )
            SELECT count(*) FROM ended
            """
        ),
        {
            "current_pairs": totals.current_pairs,
            "confirmed": totals.confirmed,
            "reset_baseline": reset_baseline,
            "run_id": run.id,
            "started_at": run.started_at,
            "tenant_id": run.tenant_id,
            "unavailable": list(totals.unavailable),
            "status": totals.status,
            "pages_fetched": totals.pages_fetched,
            "pairs_seen": totals.pairs_seen,
            "added": totals.added,
            "removed": totals.removed,
            "error": totals.error,
            "collections": orjson.dumps(totals.collections).decode(),
        },
    )


async def save_confirmed(
    connection: AsyncConnection,
    run: Run,
    *,
    confirm: Mapping[str, ConfirmedSnapshot],
    forget: Sequence[str],
) -> None:
    """Records the snapshots `confirm`ed by this run (complete and fully applied) and
    forgets those of the collections in `forget` (applied otherwise): one statement, in the
    transaction that applies them. The snapshots go as one JSON parameter, not as arrays of
    numbers and bytes, for the reason `start_run` reads them as JSON."""
    if not confirm and not forget:
        return
    await connection.execute(
        _sql(
            """
            WITH forgotten AS (
                DELETE FROM syncd.confirmed_snapshots
                 WHERE tenant_id = :tenant_id
                   AND collection = ANY(CAST(:forget AS text[]))
            )
            INSERT INTO syncd.confirmed_snapshots
                   (tenant_id, collection, total, page_size, digests, items, run_id)
            SELECT :tenant_id, c.collection, c.total, c.page_size, decode(c.digests, 'hex'),
                   c.items, :run_id
              FROM jsonb_to_recordset(CAST(:confirm AS jsonb))
                   AS c(collection text, total bigint, page_size integer, digests text,
                        items bigint)
            ON CONFLICT (tenant_id, collection) DO UPDATE
               SET total = EXCLUDED.total, page_size = EXCLUDED.page_size,
                   digests = EXCLUDED.digests, items = EXCLUDED.items,
                   run_id = EXCLUDED.run_id
            """
        ),
        {
            "tenant_id": run.tenant_id,
            "run_id": run.id,
            "forget": list(forget),
            "confirm": orjson.dumps(
                [
                    {
                        "collection": name,
                        "total": snapshot.key.total,
                        "page_size": snapshot.key.page_size,
                        "digests": snapshot.key.digests.hex(),
                        "items": snapshot.items,
                    }
                    for name, snapshot in confirm.items()
                ]
            ).decode(),
        },
    )


async def fail_run(
    connection: AsyncConnection, run_id: int, error: str, pages_fetched: int
) -> None:
    """Marks a still-running run `failed` with `error` (the caller commits)."""
    await connection.execute(
        _sql(
            _ending(
                "UPDATE syncd.runs SET status = :failed, finished_at = now(), error = :error, "
                "pages_fetched = :pages_fetched WHERE id = :run_id AND status = :running"
            )
        ),
        {
            "error": error,
            "pages_fetched": pages_fetched,
            "run_id": run_id,
            "failed": RunStatus.FAILED,
            "running": RunStatus.RUNNING,
        },
    )


async def read_tenant_status(engine: AsyncEngine) -> list[status.TenantStatus]:
    """Every tenant the database holds, by name, with its latest run, due time and live
    claim; `errors.DatabaseError` if unreadable."""
    with db.database_errors("cannot read syncd.tenant_status"):
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    _sql(
                        """
                        SELECT ts.tenant, ts.last_run_at, ts.last_status, ts.last_success_at,
                               ts.current_pairs,
                               extract(epoch FROM now() - ts.last_success_at),
                               r.id, r.finished_at, r.error, r.replica,
                               extract(epoch FROM r.finished_at - r.started_at),
                               s.due_at,
                               CASE WHEN s.claimed_until > now() THEN s.claimed_by END,
                               coalesce(s.failures, 0),
                               r.collections
                          FROM syncd.tenant_status ts
                          JOIN syncd.tenants t ON t.name = ts.tenant
                          LEFT JOIN syncd.schedule s ON s.tenant_id = t.id
                          LEFT JOIN LATERAL (
                                SELECT id, started_at, finished_at, error, replica, collections
                                  FROM syncd.runs
                                 WHERE tenant_id = t.id ORDER BY id DESC LIMIT 1
                          ) r ON true
                         ORDER BY ts.tenant
                        """
                    )
                )
            ).all()
    return [
        status.TenantStatus(
            tenant=row[0],
            last_run_at=row[1],
            last_status=None if row[2] is None else RunStatus(row[2]),
            last_success_at=row[3],
            pairs=int(row[4]),
            age_s=None if row[5] is None else float(row[5]),
            last_run_id=None if row[6] is None else int(row[6]),
            last_finished_at=row[7],
            last_error=row[8],
            last_replica=row[9],
            last_duration_s=None if row[10] is None else round(float(row[10]), 3),
            due_at=row[11],
            claimed_by=row[12],
            consecutive_failures=int(row[13]),
            collections=row[14],
        )
        for row in rows
    ]


# --- claims: which replica runs a tenant, and when it is next due ---------------------------


@dataclass(frozen=True)
class ClaimRow:
    """A tenant's `syncd.schedule` row as one claim attempt found it, before its own update.

    `won` says whether the attempt claimed the tenant; `now` is the database's clock.
    """

    tenant_id: int
    won: bool
    due_at: datetime
    failures: int
    claimed_by: str | None
    claimed_at: datetime | None
    claimed_until: datetime | None
    now: datetime


async def try_claim(
    connection: AsyncConnection,
    tenant: str,
    replica: str,
    *,
    run_timeout_s: float,
    regardless_of_due: bool,
    reclaim_own: bool,
) -> ClaimRow | None:
    """Claims `tenant` for `replica` if it is due and nobody else's claim is alive.

    One conditional UPDATE decides: two replicas that try at once queue on the row's lock,
    and the second re-checks the condition against the first one's claim (PostgreSQL's
    READ COMMITTED update rule), so exactly one wins. A claim is alive until it expires,
    `run_timeout_s` after it was taken, unless its holder died mid-run: a holder holds the
    tenant's advisory lock for as long as its run is `running`, so a run started under the
    claim that is still `running` while nobody holds the lock was left by a dead process
    (the claimant closes it as abandoned). `regardless_of_due` claims a tenant that is not
    due yet (a manual sync); `reclaim_own` takes back a claim this replica still holds (its
    release failed). None when the tenant has no schedule row yet (see `add_schedule`).

    Times are the statement's (`statement_timestamp()`), not its transaction's: a row that
    another transaction inserted while this one waited is due by this statement's clock.
    """
    row = (
        await connection.execute(
            _sql(
                f"""
                WITH target AS (
                    SELECT s.tenant_id, s.due_at, s.failures,
                           s.claimed_by, s.claimed_at, s.claimed_until
                      FROM syncd.schedule s
                      JOIN syncd.tenants t ON t.id = s.tenant_id
                     WHERE t.name = :tenant
                ), claimed AS (
                    UPDATE syncd.schedule s
                       SET claimed_by = :replica,
                           claimed_at = statement_timestamp(),
                           claimed_until = statement_timestamp()
                                           + make_interval(secs => :run_timeout_s)
                      FROM target
                     WHERE s.tenant_id = target.tenant_id
                       AND (s.due_at <= statement_timestamp() OR :regardless_of_due)
                       AND (s.claimed_until IS NULL
                            OR s.claimed_until <= statement_timestamp()
                            OR (:reclaim_own AND s.claimed_by = :replica)
                            OR (EXISTS (SELECT FROM syncd.runs r
                                         WHERE r.tenant_id = s.tenant_id
                                           AND r.status = '{RunStatus.RUNNING}'
                                           AND r.started_at >= s.claimed_at)
                                AND NOT EXISTS (
                                    SELECT FROM pg_locks l
                                     WHERE l.locktype = 'advisory'
                                       AND l.database = (SELECT oid FROM pg_database
                                                          WHERE datname = current_database())
                                       AND l.classid = :namespace
                                       AND l.objid = s.tenant_id
                                       AND l.objsubid = 2)))
                    RETURNING s.tenant_id
                )
                SELECT target.tenant_id, EXISTS (SELECT FROM claimed), target.due_at,
                       target.failures, target.claimed_by, target.claimed_at,
                       target.claimed_until, statement_timestamp()
                  FROM target
                """
            ),
            {
                "tenant": tenant,
                "replica": replica,
                "run_timeout_s": run_timeout_s,
                "regardless_of_due": regardless_of_due,
                "reclaim_own": reclaim_own,
                "namespace": LOCK_NAMESPACE,
            },
        )
    ).one_or_none()
    if row is None:
        return None
    return ClaimRow(
        tenant_id=int(row[0]),
        won=bool(row[1]),
        due_at=row[2],
        failures=int(row[3]),
        claimed_by=row[4],
        claimed_at=row[5],
        claimed_until=row[6],
        now=row[7],
    )


async def add_schedule(connection: AsyncConnection, tenant: str) -> None:
    """Gives a tenant seen for the first time its rows, due now (a no-op when it has them)."""
    tenant_id = await ensure_tenant(connection, tenant)
    await connection.execute(
        _sql(
            "INSERT INTO syncd.schedule (tenant_id, due_at) VALUES (:tenant_id, now()) "
            "ON CONFLICT (tenant_id) DO NOTHING"
        ),
        {"tenant_id": tenant_id},
    )


async def release_claim(
    connection: AsyncConnection,
    tenant_id: int,
    replica: str,
    claimed_at: datetime,
    *,
    due_at: datetime,
    failures: int,
    schedule: str,
) -> bool:
    """Sets the next due time and clears the claim `replica` took at `claimed_at`.

    False when that claim is no longer there (it expired and another replica took the
    tenant): then nothing changes, the new holder decides.
    """
    result = await connection.execute(
        _sql(
            "UPDATE syncd.schedule SET due_at = :due_at, failures = :failures, "
            "schedule = :schedule, claimed_by = NULL, claimed_at = NULL, claimed_until = NULL "
            "WHERE tenant_id = :tenant_id AND claimed_by = :replica AND claimed_at = :claimed_at"
        ),
        {
            "tenant_id": tenant_id,
            "replica": replica,
            "claimed_at": claimed_at,
            "due_at": due_at,
            "failures": failures,
            "schedule": schedule,
        },
    )
    return bool(result.rowcount)
