"""Generated tenants and their backup copy job links, the same for the same seed.

The shapes come from the field: a copy job links 1-5 source jobs, a source job can feed
several copy jobs, `uniqueJobUid` is missing on older servers' jobs, and now and then one
VBR job is known to VSPC twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_DUPLICATE_JOB_FRACTION = 0.005
_SHARED_SOURCE_FRACTION = 0.1


@dataclass
class SimTenant:
    """One VSPC account (or server) and its dataset; all tenants share one simulator."""

    name: str
    api_key: str = field(repr=False)
    username: str
    password: str = field(repr=False)
    items: list[dict[str, str]] = field(repr=False)
    mfa: bool = False
    read_only_key: bool = False


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


def make_dataset(
    *, tenants: int, pairs_per_tenant: int, seed: int = 0, unique_uid_fraction: float = 0.9
) -> list[SimTenant]:
    """Deterministic tenants "tenant-1".. each with exactly `pairs_per_tenant` distinct pairs.

    Backup copy jobs link 1-5 source jobs (sometimes shared between copy jobs);
    `uniqueJobUid` is present on about `unique_uid_fraction` of copy jobs. About 0.5% of copy
    jobs appear twice, with the same `jobUid` and different `uniqueJobUid`s.
    """
    result = []
    for number in range(1, tenants + 1):
        name = f"tenant-{number}"
        rng = random.Random(f"syncd-simulator:{seed}:{name}")  # noqa: S311 - test data
        sources: list[str] = []
        items: list[dict[str, str]] = []
        while len(items) < pairs_per_tenant:
            items.extend(copy_job_items(rng, sources, unique_uid_fraction, rng.randint(1, 5)))
        del items[pairs_per_tenant:]
        result.append(
            SimTenant(
                name=name,
                api_key=f"sim-key-{name}-{rng.getrandbits(96):024x}",
                username=f"{name}-user",
                password=f"{rng.getrandbits(64):016x}",
                items=items,
            )
        )
    return result
