"""The VSPC collections syncd copies, as declarative specs: pure data, no I/O.

A collection is either a set of *links* (backup copy job -> source job pairs, kept as
presence intervals in `syncd.links`, one copy mode per collection) or a *catalog* (items
with a UUID identity, kept in `syncd.catalog_items` as versions: a new version when a
descriptive field changes, volatile fields updated in place). The engine (paging, client,
staging, diff, guard) is the same for every collection; adding one is an entry in
`COLLECTIONS` plus a migration for its views.

Fields are named twice: by the JSON key VSPC sends (`source`, also the key in the jsonb
columns, so the stored data reads like the API) and by the column of the reporting views.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

API = "/api/v3"


class Kind(enum.StrEnum):
    """How a collection is stored."""

    LINKS = "links"
    CATALOG = "catalog"


class FieldType(enum.StrEnum):
    """The JSON types syncd accepts for a field (anything else is a page problem)."""

    UUID = "uuid"
    TEXT = "text"
    BOOL = "bool"
    TIMESTAMP = "timestamp"
    INT = "int"


class CopyMode(enum.StrEnum):
    """The two backup copy modes of VBR, each with its own objects endpoint."""

    PERIODIC = "periodic"
    IMMEDIATE = "immediate"


class Status(enum.StrEnum):
    """How one collection of one run ended (`sync_runs.collections`)."""

    SUCCEEDED = "succeeded"  # complete snapshot applied
    PARTIAL = "partial"  # additions and changes stored, removals withheld
    FAILED = "failed"  # nothing applied
    UNAVAILABLE = "unavailable"  # the server has no such collection (HTTP 404): not a failure


TEXT_MAX_CHARS = 1000
"""Longest text value kept from a catalog item (names, descriptions): server text is data."""


@dataclass(frozen=True)
class Field:
    """One field of an item: its JSON key, its view column, its type."""

    source: str
    column: str
    type: FieldType


@dataclass(frozen=True)
class Collection:
    """One VSPC collection and how syncd keeps it.

    `sort` is the `sort` query parameter's properties: a total order over the items (the
    identity fields), so that overlapping pages can be compared. Links collections have the
    fixed identity (jobUid, uniqueJobUid, linkedJobUid) and a `copy_mode`; catalogs have
    one UUID `identity` field, `descriptive` fields kept with history and `volatile` fields
    kept current-only. Any other field VSPC sends is dropped on arrival.
    """

    name: str
    path: str
    kind: Kind
    sort: tuple[str, ...]
    identity: tuple[Field, ...]
    descriptive: tuple[Field, ...] = ()
    volatile: tuple[Field, ...] = ()
    copy_mode: CopyMode | None = None
    noun: str = "items"  # in messages: "pairs", "jobs", ...

    @property
    def fields(self) -> tuple[Field, ...]:
        """Every field kept, identity first."""
        return self.identity + self.descriptive + self.volatile


def _uuid(source: str, column: str) -> Field:
    return Field(source, column, FieldType.UUID)


def _text(source: str, column: str) -> Field:
    return Field(source, column, FieldType.TEXT)


_LINK_IDENTITY = (
    _uuid("jobUid", "job_uid"),
    _uuid("uniqueJobUid", "unique_job_uid"),
    _uuid("linkedJobUid", "linked_job_uid"),
)
# Sorting on all three fields leaves no ties, so the order of items is total and stable.
_LINK_SORT = ("jobUid", "linkedJobUid", "uniqueJobUid")

BACKUP_COPY_JOB_OBJECTS = Collection(
    name="backup_copy_job_objects",
    path=f"{API}/infrastructure/backupServers/jobs/backupCopyJobs/jobObjects",
    kind=Kind.LINKS,
    sort=_LINK_SORT,
    identity=_LINK_IDENTITY,
    copy_mode=CopyMode.PERIODIC,
    noun="pairs",
)
IMMEDIATE_COPY_JOB_OBJECTS = Collection(
    name="immediate_copy_job_objects",
    path=f"{API}/infrastructure/backupServers/jobs/simpleBackupCopyJobs/objects",
    kind=Kind.LINKS,
    sort=_LINK_SORT,
    identity=_LINK_IDENTITY,
    copy_mode=CopyMode.IMMEDIATE,
    noun="pairs",
)
JOBS = Collection(
    name="jobs",
    path=f"{API}/infrastructure/backupServers/jobs",
    kind=Kind.CATALOG,
    sort=("instanceUid",),
    identity=(_uuid("instanceUid", "job_uid"),),
    descriptive=(
        _uuid("uniqueUid", "unique_job_uid"),
        _text("name", "name"),
        _text("type", "type"),
        _text("description", "description"),
        _uuid("backupServerUid", "backup_server_uid"),
        _uuid("organizationUid", "organization_uid"),
        _uuid("mappedOrganizationUid", "mapped_organization_uid"),
        Field("isEnabled", "is_enabled", FieldType.BOOL),
    ),
    volatile=(
        _text("status", "status"),
        Field("lastRun", "last_run_at", FieldType.TIMESTAMP),
        Field("lastEndTime", "last_end_at", FieldType.TIMESTAMP),
    ),
    noun="jobs",
)
BACKUP_SERVERS = Collection(
    name="backup_servers",
    path=f"{API}/infrastructure/backupServers",
    kind=Kind.CATALOG,
    sort=("instanceUid",),
    identity=(_uuid("instanceUid", "backup_server_uid"),),
    descriptive=(
        _text("name", "name"),
        _text("version", "version"),
        _uuid("organizationUid", "organization_uid"),
    ),
    noun="backup servers",
)
# Organizations carry contact data (email, phone, addresses, tax id): personal data that a
# job report does not need. Only these four fields are ever kept.
ORGANIZATIONS = Collection(
    name="organizations",
    path=f"{API}/organizations",
    kind=Kind.CATALOG,
    sort=("instanceUid",),
    identity=(_uuid("instanceUid", "organization_uid"),),
    descriptive=(_text("name", "name"), _text("alias", "alias"), _text("type", "type")),
    noun="organizations",
)

COLLECTIONS: dict[str, Collection] = {
    collection.name: collection
    for collection in (
        BACKUP_COPY_JOB_OBJECTS,
        IMMEDIATE_COPY_JOB_OBJECTS,
        JOBS,
        BACKUP_SERVERS,
        ORGANIZATIONS,
    )
}
"""Every collection, in the order syncd fetches, applies and reports them."""

LINK_COLLECTIONS = tuple(c for c in COLLECTIONS.values() if c.kind is Kind.LINKS)

# Job types a backup copy job (periodic or immediate) takes as its source: VM backups
# (VMware vSphere, Hyper-V), Veeam Agent backups managed by the backup server, and Veeam
# Agent backup policies. See the README ("syncd.unprotected_jobs") for what is left out
# and why. The view `unprotected_jobs` (migration 0004) holds the same list.
PROTECTABLE_JOB_TYPES = ("BackupVm", "AgentBackupJob", "AgentPolicy")


def by_names(names: Iterable[str]) -> tuple[Collection, ...]:
    """The collections called `names`, in `COLLECTIONS` order; KeyError for an unknown one."""
    wanted = set(names)
    unknown = wanted - set(COLLECTIONS)
    if unknown:
        raise KeyError(sorted(unknown)[0])
    return tuple(c for c in COLLECTIONS.values() if c.name in wanted)


def check_names(value: object) -> tuple[str, ...]:
    """`[sync] collections` validated: a non-empty list of known names, in `COLLECTIONS`
    order, each once. Raises ValueError naming the unknown ones and the known ones."""
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of collection names")
    if not value:
        raise ValueError(f"must name at least one collection of {', '.join(COLLECTIONS)}")
    unknown = [name for name in value if name not in COLLECTIONS]
    if unknown:
        raise ValueError(
            f"unknown collection(s) {', '.join(map(repr, unknown))}; known: "
            f"{', '.join(COLLECTIONS)}"
        )
    return tuple(c.name for c in by_names(value))
