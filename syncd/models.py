"""The tables in schema `syncd`. Reporting tools read the views built on them (see README).

One durable table of presence intervals (`links`) holds a row per (pair, copy mode, stretch
of time the pair was present). The reporting views `job_links_current`, `job_links_history`
and `job_link_changes` all derive from it, so an added pair costs one row write, a removed
pair one row update, and a sync that changes nothing writes no link rows at all.

One generic table (`catalog_items`) holds every catalog collection (jobs, backup servers,
organizations: see `collections.py`) as versions: descriptive fields in `attributes`, a new
row when they change; volatile fields in `volatile`, updated in place when they change. A new
catalog collection is a spec and a migration adding its views, not a new table.

Alembic's environment, the tests and the benchmarks read these definitions. `sync`, `check`,
`status` and the daemon never import this module (building the ORM's classes is a few percent
of their start-up; `migrate` and `demo` load it through Alembic): the names they need are in
`schema`, the run statuses in `status`.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from syncd.schema import SCHEMA
from syncd.status import RunStatus

STORED_RUN_STATUSES = (
    RunStatus.RUNNING,
    RunStatus.SUCCEEDED,
    RunStatus.PARTIAL,
    RunStatus.FAILED,
)
RUN_STATUS_CHECK = "status IN (" + ", ".join(f"'{status}'" for status in STORED_RUN_STATUSES) + ")"
COPY_MODE_CHECK = "copy_mode IN ('periodic', 'immediate')"

metadata = MetaData(
    schema=SCHEMA,
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    },
)


class Base(DeclarativeBase):
    metadata = metadata


class TenantRow(Base):
    """A tenant ever synced. Rows stay when a tenant leaves the config: its data is kept."""

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # The last complete snapshot applied: which run, and when it started. A pair whose open
    # interval began at or before that run was in it; this is how `last_confirmed_at` is known
    # without rewriting every link row on every sync.
    confirmed_run_id: Mapped[int | None] = mapped_column(BigInteger)
    confirmed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    current_pairs: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    # Runs that started before this are not part of the mass-delete guard's baseline:
    # set when an operator allowed a mass delete (`--allow-mass-delete`).
    delete_baseline_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Collections the tenant's server answered 404 for in its last run (an older VSPC): kept
    # so that a run warns only when the set changes, not every time.
    unavailable_collections: Mapped[list[str]] = mapped_column(
        ARRAY(Text), server_default=text("'{}'")
    )


class RunRow(Base):
    """One sync of one tenant (reporting view: `syncd.sync_runs`)."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(RUN_STATUS_CHECK, name="status_known"),
        Index(None, "tenant_id", "id"),
        Index(None, "tenant_id", postgresql_where=text("status = 'running'")),
        # The mass-delete guard's baseline: the tenant's runs within a window (a collection
        # can succeed in a run that is partial as a whole).
        Index(None, "tenant_id", "started_at"),
        # The status page's last-24-hours aggregate.
        Index(None, "started_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(Text)
    pages_fetched: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    pairs_seen: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    pairs_added: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    pairs_removed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)
    # Who ran it: helps an operator tell which process left a run behind.
    host: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int | None] = mapped_column(Integer)
    # Each collection's outcome, by name: {"status", "pages", "seen", "added", "removed",
    # "changed", "error"}; NULL for runs before syncd synced several collections.
    collections: Mapped[dict[str, object] | None] = mapped_column(JSONB)
    # `[daemon] replica_name` of the process that ran it; NULL for runs before replicas.
    replica: Mapped[str | None] = mapped_column(Text)


class RunHourRow(Base):
    """The finished runs of one tenant that started in one hour, by how they ended: the
    status page's 24-hour charts read these, never the runs themselves.

    `store` adds a run here in the statement that ends it (finished, failed or abandoned),
    so the rollup commits with the run's status. Runs still `running` are not in it.
    """

    __tablename__ = "run_hours"
    __table_args__ = (CheckConstraint("status <> 'running'", name="status_finished"),)

    # The hour first: the page reads a range of hours for every tenant at once.
    hour: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    status: Mapped[str] = mapped_column(Text, primary_key=True)
    runs: Mapped[int] = mapped_column(Integer)
    # Runs with a finish time (all that syncd ended; older rows may lack one), and the sum
    # and the longest of their durations.
    runs_timed: Mapped[int] = mapped_column(Integer)
    duration_sum_s: Mapped[float] = mapped_column(Double)
    duration_max_s: Mapped[float | None] = mapped_column(Double)
    pairs_added: Mapped[int] = mapped_column(BigInteger)
    pairs_removed: Mapped[int] = mapped_column(BigInteger)


class ScheduleRow(Base):
    """When each tenant is next due, and which replica holds it now (see `claims`).

    Every replica's local timer asks this table; one conditional UPDATE decides who runs.
    A claim lasts at most the tenant's `run_timeout`: a replica that dies mid-run leaves a
    claim that expires, never one that blocks the tenant for good.
    """

    __tablename__ = "schedule"
    __table_args__ = (
        CheckConstraint(
            "(claimed_by IS NULL) = (claimed_at IS NULL) "
            "AND (claimed_by IS NULL) = (claimed_until IS NULL)",
            name="claim_whole",
        ),
    )

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The schedule that set `due_at` ("every 900s", "cron */15 * * * *"): during a rolling
    # config change, the replica that finishes a run decides the next due time.
    schedule: Mapped[str | None] = mapped_column(Text)
    # Failed runs in a row, whichever replica ran them: the failure backoff is shared.
    failures: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    claimed_by: Mapped[str | None] = mapped_column(Text)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ConfirmedSnapshotRow(Base):
    """The last snapshot of a tenant's collection that was complete and fully applied.

    A later snapshot with the same key (total, page size, every page's digest) has the same
    items, and the stored data already equals it: the run skips staging and diff for that
    collection. Written in the transaction that applies a complete snapshot with removals;
    deleted by one that applies any other way; untouched when nothing is applied. Triggers
    (migration 0007) delete every row when `links` or `catalog_items` change outside the
    apply (which sets `syncd.applying` for its transaction): a hand edit, a migration.
    """

    __tablename__ = "confirmed_snapshots"
    __table_args__ = (CheckConstraint("octet_length(digests) % 16 = 0", name="digests_whole"),)

    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    collection: Mapped[str] = mapped_column(Text, primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger)
    page_size: Mapped[int] = mapped_column(Integer)
    # Every page's 16-byte digest, in offset order.
    digests: Mapped[bytes] = mapped_column(LargeBinary)
    # Items stored once the snapshot was applied (distinct: pages may list one twice).
    items: Mapped[int] = mapped_column(BigInteger)
    run_id: Mapped[int] = mapped_column(BigInteger)


class LinkRow(Base):
    """One presence interval of a pair; `valid_to` NULL while the pair is present.

    No foreign keys on purpose: a constraint trigger per inserted row would dominate the cost
    of an initial load of millions of pairs, and only `store` writes this table.
    """

    __tablename__ = "links"
    __table_args__ = (
        CheckConstraint(COPY_MODE_CHECK, name="copy_mode_known"),
        # The diff's lookup and the guarantee of one open interval per pair and mode.
        Index(
            "uq_links_open_pair",
            "tenant_id",
            "copy_mode",
            "job_uid",
            "linked_job_uid",
            "unique_job_uid",
            unique=True,
            postgresql_where=text("valid_to IS NULL"),
        ),
        Index(None, "tenant_id", "valid_from"),
        Index(None, "valid_to", postgresql_where=text("valid_to IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    job_uid: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    unique_job_uid: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    linked_job_uid: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    valid_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    valid_to: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    opened_run_id: Mapped[int] = mapped_column(BigInteger)
    closed_run_id: Mapped[int | None] = mapped_column(BigInteger)
    # Which backup copy mode links the pair: its collection's `copy_mode`.
    copy_mode: Mapped[str] = mapped_column(Text, server_default=text("'periodic'"))


class CatalogItemRow(Base):
    """One version of one catalog item; `valid_to` NULL for the current version.

    `attributes` holds the descriptive fields (a change closes this version and opens the
    next), `volatile` the current-only ones (updated in place). Keys are VSPC's field names.
    `first_seen_at` is the start of the item's current presence, carried across versions.
    No foreign keys, as for `links`.
    """

    __tablename__ = "catalog_items"
    __table_args__ = (
        # The diff's lookup and the guarantee of one current version per item.
        Index(
            "uq_catalog_items_open_item",
            "tenant_id",
            "collection",
            "uid",
            unique=True,
            postgresql_where=text("valid_to IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    collection: Mapped[str] = mapped_column(Text)
    uid: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    attributes: Mapped[dict[str, object]] = mapped_column(JSONB)
    volatile: Mapped[dict[str, object]] = mapped_column(JSONB)
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    valid_from: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    valid_to: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    opened_run_id: Mapped[int] = mapped_column(BigInteger)
    closed_run_id: Mapped[int | None] = mapped_column(BigInteger)
