"""Generated tenants, their backup copy job links and their catalog, the same for the same
seed.

The shapes come from the field: a copy job links 1-5 source jobs, a source job can feed
several copy jobs, `uniqueJobUid` is missing on older servers' jobs, and now and then one
VBR job is known to VSPC twice. The catalog (jobs, backup servers, organizations) agrees
with the links: every linked job is in it except a few deleted ones, and some enabled
backup jobs are copied by nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

_DUPLICATE_JOB_FRACTION = 0.005
_SHARED_SOURCE_FRACTION = 0.1
# Source jobs of links that the catalog lacks (deleted in VBR, links not yet gone).
_DELETED_SOURCE_FRACTION = 0.01
# Enabled backup jobs that no copy job copies, per linked source job.
_UNPROTECTED_FRACTION = 0.1
_SOURCE_TYPES = ("BackupVm",) * 7 + ("AgentBackupJob",) * 2 + ("AgentPolicy",)
# Jobs a backup copy job does not take as its source: never "unprotected".
_OTHER_TYPES = ("ReplicationVM", "BackupToTape", "SureBackup", "BackupFile")
_STATUSES = ("Success",) * 8 + ("Warning", "Failed")
_EPOCH = datetime(2026, 11, 1, tzinfo=UTC)

Item = dict[str, Any]
"""One item of a collection as VSPC sends it."""

LINK_COLLECTIONS = ("backup_copy_job_objects", "immediate_copy_job_objects")
COLLECTIONS = (*LINK_COLLECTIONS, "jobs", "backup_servers", "organizations")
"""The collections the simulator serves, by the names syncd gives them."""


@dataclass
class SimTenant:
    """One VSPC account (or server) and its dataset; all tenants share one simulator.

    `items` are the periodic backup copy job links, `immediate_items` the immediate ones;
    `jobs`, `backup_servers` and `organizations` the catalog. With `catalog_follows_links`,
    pairs added later bring their new jobs into the catalog.
    """

    name: str
    api_key: str = field(repr=False)
    username: str
    password: str = field(repr=False)
    items: list[dict[str, str]] = field(repr=False)
    mfa: bool = False
    read_only_key: bool = False
    immediate_items: list[dict[str, str]] = field(default_factory=list, repr=False)
    jobs: list[Item] = field(default_factory=list, repr=False)
    backup_servers: list[Item] = field(default_factory=list, repr=False)
    organizations: list[Item] = field(default_factory=list, repr=False)
    catalog_follows_links: bool = False

    def collection(self, name: str) -> list[Any]:
        """The items of collection `name` (one of `COLLECTIONS`), the list itself."""
        lists: dict[str, list[Any]] = {
            "backup_copy_job_objects": self.items,
            "immediate_copy_job_objects": self.immediate_items,
            "jobs": self.jobs,
            "backup_servers": self.backup_servers,
            "organizations": self.organizations,
        }
        return lists[name]


def random_uuid4(rng: random.Random) -> str:
    """A random version-4 UUID drawn from `rng` (reproducible, unlike `uuid.uuid4`)."""
    value = rng.getrandbits(128)
    value = (value & ~(0xF000 << 64)) | (0x4000 << 64)
    value = (value & ~(0xC000 << 48)) | (0x8000 << 48)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def copy_job_items(
    rng: random.Random, sources: list[str], unique_uid_fraction: float, links: int
) -> list[dict[str, str]]:
    """Pairs of one new backup copy job linked to `links` source jobs, some of them taken
    from `sources`, which gains the new ones."""
    job_uid = random_uuid4(rng)
    linked: list[str] = []
    while len(linked) < links:
        if sources and rng.random() < _SHARED_SOURCE_FRACTION:
            # One source job can feed several copy jobs.
            candidate = rng.choice(sources)
            if candidate in linked:
                continue
        else:
            candidate = random_uuid4(rng)
            sources.append(candidate)
        linked.append(candidate)
    uniques: list[str | None]
    if rng.random() < _DUPLICATE_JOB_FRACTION:
        # Seen in the field: one VBR job known to VSPC twice (e.g. a re-added server).
        uniques = [random_uuid4(rng), random_uuid4(rng)]
    elif rng.random() < unique_uid_fraction:
        uniques = [random_uuid4(rng)]
    else:
        uniques = [None]
    items = []
    for unique in uniques:
        for source in linked:
            item = {"jobUid": job_uid, "linkedJobUid": source}
            if unique is not None:
                item["uniqueJobUid"] = unique
            items.append(item)
    return items


def _links(
    rng: random.Random, sources: list[str], unique_uid_fraction: float, count: int
) -> list[dict[str, str]]:
    items: list[dict[str, str]] = []
    while len(items) < count:
        items.extend(copy_job_items(rng, sources, unique_uid_fraction, rng.randint(1, 5)))
    del items[count:]
    return items


def make_dataset(
    *,
    tenants: int,
    pairs_per_tenant: int,
    seed: int = 0,
    unique_uid_fraction: float = 0.9,
    immediate_pairs_per_tenant: int = 0,
    catalog: bool = True,
) -> list[SimTenant]:
    """Deterministic tenants "tenant-1".. each with exactly `pairs_per_tenant` distinct
    periodic pairs and `immediate_pairs_per_tenant` immediate ones, and (with `catalog`) the
    jobs, backup servers and organizations they name (see `make_catalog`).

    Backup copy jobs link 1-5 source jobs (sometimes shared between copy jobs, of either
    mode); `uniqueJobUid` is present on about `unique_uid_fraction` of copy jobs. About 0.5%
    of copy jobs appear twice, with the same `jobUid` and different `uniqueJobUid`s. The
    periodic pairs, keys and passwords do not depend on the other arguments.
    """
    result = []
    for number in range(1, tenants + 1):
        name = f"tenant-{number}"
        rng = random.Random(f"syncd-simulator:{seed}:{name}")  # noqa: S311 - test data
        sources: list[str] = []
        items = _links(rng, sources, unique_uid_fraction, pairs_per_tenant)
        tenant = SimTenant(
            name=name,
            api_key=f"sim-key-{name}-{rng.getrandbits(96):024x}",
            username=f"{name}-user",
            password=f"{rng.getrandbits(64):016x}",
            items=items,
        )
        if immediate_pairs_per_tenant:
            immediate_rng = random.Random(f"syncd-simulator:{seed}:{name}:immediate")  # noqa: S311
            tenant.immediate_items = _links(
                immediate_rng, sources, unique_uid_fraction, immediate_pairs_per_tenant
            )
        if catalog:
            make_catalog(tenant, random.Random(f"syncd-simulator:{seed}:{name}:catalog"))  # noqa: S311
        result.append(tenant)
    return result


class _Catalog:
    """Builds catalog items for a tenant: organizations, servers, then jobs on them."""

    def __init__(self, tenant: SimTenant, rng: random.Random) -> None:
        self.tenant = tenant
        self.rng = rng
        self.numbers = len(tenant.jobs)

    def organizations(self, companies: int) -> None:
        rng = self.rng
        provider = {
            "instanceUid": random_uuid4(rng),
            "name": f"{self.tenant.name} provider",
            "alias": "provider",
            "type": "Provider",
            "email": f"noc@{self.tenant.name}.example",
        }
        self.tenant.organizations.append(provider)
        for number in range(1, companies + 1):
            # Contact data, as VSPC sends it: personal data syncd must not keep.
            self.tenant.organizations.append(
                {
                    "instanceUid": random_uuid4(rng),
                    "name": f"Company {number:03d}",
                    "alias": f"co{number:03d}",
                    "type": "Company",
                    "email": f"admin@co{number:03d}.example",
                    "phone": f"+1-555-{number:04d}",
                    "address": f"{number} Main Street",
                    "taxId": f"TX{rng.getrandbits(32):08x}",
                }
            )

    def backup_servers(self, count: int) -> None:
        for number in range(1, count + 1):
            owner = self.rng.choice(self.tenant.organizations)
            self.tenant.backup_servers.append(
                {
                    "instanceUid": random_uuid4(self.rng),
                    "name": f"vbr-{number:02d}.{owner['alias']}.example",
                    "organizationUid": owner["instanceUid"],
                    "version": "12.3.1.1139",
                    "displayVersion": "12.3.1.1139 P20250315",
                    "status": "Healthy",
                    "managementAgentUid": random_uuid4(self.rng),
                }
            )

    def job(
        self, uid: str, job_type: str, *, unique: str | None = None, enabled: bool = True
    ) -> Item:
        """A new job (its name numbered in the tenant), appended to the tenant's jobs."""
        rng = self.rng
        self.numbers += 1
        server = rng.choice(self.tenant.backup_servers)
        companies = [o for o in self.tenant.organizations if o["type"] == "Company"]
        last_run = _EPOCH + timedelta(minutes=rng.randrange(60 * 24 * 28))
        label = {
            "BackupCopy": "Offsite copy",
            "SimpleBackupCopy": "Immediate copy",
            "BackupVm": "VM backup",
            "AgentBackupJob": "Agent backup",
            "AgentPolicy": "Agent policy",
        }.get(job_type, job_type)
        job: Item = {
            "instanceUid": uid,
            "uniqueUid": unique or random_uuid4(rng),
            "name": f"{label} {self.numbers:05d}",
            "description": f"Created by {self.tenant.name}\\admin",
            "type": job_type,
            "backupServerUid": server["instanceUid"],
            "organizationUid": server["organizationUid"],
            "isEnabled": enabled,
            "status": rng.choice(_STATUSES),
            "lastRun": last_run.isoformat(),
            "lastEndTime": (last_run + timedelta(minutes=rng.randrange(1, 90))).isoformat(),
            "lastDuration": rng.randrange(60, 5400),
            "processingRate": rng.randrange(10**6, 10**9),
            "bottleneck": "Source",
        }
        if companies and rng.random() < 0.6:
            job["mappedOrganizationUid"] = rng.choice(companies)["instanceUid"]
        self.tenant.jobs.append(job)
        return job

    def jobs_of(self, items: list[dict[str, str]], copy_type: str, known: set[str]) -> None:
        """Catalog entries for the copy and source jobs `items` link that are not `known`."""
        for item in items:
            for uid, job_type, unique in (
                (item["jobUid"], copy_type, item.get("uniqueJobUid")),
                (item["linkedJobUid"], None, None),
            ):
                if uid not in known:
                    known.add(uid)
                    self.job(uid, job_type or self.rng.choice(_SOURCE_TYPES), unique=unique)


def make_catalog(tenant: SimTenant, rng: random.Random) -> None:
    """Fills `tenant`'s catalog consistently with its links: organizations (a provider and
    companies, with contact data), backup servers, a job for every copy job (`BackupCopy`,
    or `SimpleBackupCopy` for immediate ones) and every source job, except about 1% of the
    source jobs (deleted in VBR while still linked); plus about 10% more enabled backup jobs
    that nothing copies, a few disabled ones, and jobs of types a copy job cannot copy."""
    catalog = _Catalog(tenant, rng)
    links = tenant.items + tenant.immediate_items
    copy_jobs = {item["jobUid"] for item in links}
    source_jobs = list(dict.fromkeys(i["linkedJobUid"] for i in links if i["linkedJobUid"]))
    catalog.organizations(companies=max(2, len(copy_jobs) // 40))
    catalog.backup_servers(max(1, (len(copy_jobs) + len(source_jobs)) // 150))
    known: set[str] = set()
    catalog.jobs_of(tenant.items, "BackupCopy", known)
    catalog.jobs_of(tenant.immediate_items, "SimpleBackupCopy", known)
    deleted = round(len(source_jobs) * _DELETED_SOURCE_FRACTION) if len(source_jobs) >= 20 else 0
    doomed = set(rng.sample([uid for uid in source_jobs if uid not in copy_jobs], deleted))
    tenant.jobs[:] = [job for job in tenant.jobs if job["instanceUid"] not in doomed]
    for _ in range(max(1, round(len(source_jobs) * _UNPROTECTED_FRACTION))):
        catalog.job(random_uuid4(rng), rng.choice(_SOURCE_TYPES))
    catalog.job(random_uuid4(rng), "BackupVm", enabled=False)
    for job_type in _OTHER_TYPES:
        catalog.job(random_uuid4(rng), job_type)
    tenant.catalog_follows_links = True


def add_jobs_for(
    tenant: SimTenant, items: list[dict[str, str]], copy_type: str, rng: random.Random
) -> None:
    """Catalog entries for the jobs that new `items` link and the catalog does not know yet."""
    known = {job["instanceUid"] for job in tenant.jobs}
    _Catalog(tenant, rng).jobs_of(items, copy_type, known)


def make_jobs(tenant: SimTenant, count: int, rng: random.Random) -> None:
    """A catalog of `count` jobs unrelated to the tenant's links (for benchmarks), on a few
    servers of a few organizations."""
    catalog = _Catalog(tenant, rng)
    catalog.organizations(companies=max(2, count // 100))
    catalog.backup_servers(max(1, count // 500))
    for _ in range(count):
        catalog.job(random_uuid4(rng), rng.choice(_SOURCE_TYPES))
