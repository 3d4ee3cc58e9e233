"""VSPC misbehaving, seen from one tenant's run: what the user is told, what the database
keeps, and that the next run heals without help.

Every scenario: a clean baseline sync (S0), churn in VSPC (S1 = S0 - 4 pairs + 3), the fault,
then a clean run. A failed run must leave S0; a partial one S0 plus only pairs of S1 (never a
removal) and every pair of the pages that passed; a succeeded one exactly S1. The clean run
after must store S1 exactly. `assert_history_sound` checks intervals and bookkeeping.

Already covered elsewhere, not repeated: a later page failing forever with 520 and the other
tenants syncing meanwhile, 403 on the first page, drift without recovery, the mass-delete
guard (tests/test_sync.py); request-level retry/auth details (client tests); faults on the
catalog collections and runs where collections end differently (tests/test_catalog.py).
These runs read the periodic links alone, so that each scenario's outcome is its pages'.
"""

from __future__ import annotations

import dataclasses
import itertools
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import simulator as sim
from syncd.sync import SyncResult, sync_tenant
from tests.fixtures.fault_helpers import assert_history_sound, pairs_outside, run_row, sort_key
from tests.fixtures.helpers import (
    current_pairs,
    expected_pairs,
    tenant_for,
)

TENANT = "tenant-1"
PAGE = (
    50  # tests.fixtures.helpers.FAST_SETTINGS page_size; pages start at 0, 49, 98, ... (overlap 1)
)


@dataclass(frozen=True)
class Scenario:
    """One fault: what to inject, and what the user and the database must see."""

    faults: Callable[[], list[sim.Fault]]
    status: str
    error_parts: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    password: bool = False
    # Sorted positions [start, stop) whose pairs a partial run may miss; None: unknown.
    lost_window: tuple[int, int] | None = None
    # Runs when the run's first page has arrived (e.g. to change VSPC's data mid-snapshot).
    after_first_page: Callable[[sim.SimulatorState], None] | None = None


def _on(kind: str, offset: int | None = None, times: int | None = None, **kw: Any) -> sim.Fault:
    return sim.Fault(kind=kind, tenant=TENANT, offset=offset, times=times, **kw)


def _shift_every_position(state: sim.SimulatorState) -> None:
    """Deletes the pair at sorted position 0 and adds one that sorts last: the total stays,
    but every position shifts by one. It runs while the first page is handled, before any
    later page is fetched, so page 0 (old) and page 49 (new) disagree at position 49.
    """
    items = state.tenants[TENANT].items
    items.remove(min(items, key=sort_key))
    items.append(
        {
            "jobUid": "ffffffff-ffff-4fff-8fff-ffffffffffff",
            "linkedJobUid": "ffffffff-ffff-4fff-8fff-fffffffffffe",
        }
    )
    state.invalidate(TENANT)


def _window(offset: int) -> tuple[int, int]:
    # The failing page's positions; its first and last are shared with the neighbours.
    return (offset, offset + PAGE)


SCENARIOS: dict[str, Scenario] = {
    "520-burst-on-several-pages-recovers": Scenario(
        lambda: [_on("520", offset, times=2) for offset in (0, 49, 98, 147)], "succeeded"
    ),
    "520-forever-on-first-page": Scenario(
        lambda: [_on("520", 0)],
        "failed",
        ("tenant 'tenant-1', offset 0", "HTTP 520", "gave up after 2 retries"),
    ),
    "520-logical-not-retried": Scenario(
        lambda: [_on("520", 49, error_type="logical")],
        "partial",
        ("removals withheld", "offset 49", "HTTP 520"),
        lost_window=_window(49),
    ),
    "429-forever-on-a-later-page": Scenario(
        lambda: [_on("429", 147, retry_after_s=0.01)],
        "partial",
        ("removals withheld", "offset 147", "HTTP 429", "gave up after 2 retries"),
        lost_window=_window(147),
    ),
    "400-logical-on-a-later-page": Scenario(
        lambda: [_on("status", 196, status=400)],
        "partial",
        ("removals withheld", "offset 196", "HTTP 400", "Simulated error 400"),
        lost_window=_window(196),
    ),
    "401-forever-password-auth": Scenario(
        lambda: [_on("401")],
        "failed",
        ("tenant 'tenant-1', offset 0", "still refused after renewing the access token"),
        password=True,
    ),
    "async-202-on-every-page": Scenario(lambda: [_on("async202", polls=2)], "succeeded"),
    "async-202-never-done": Scenario(
        lambda: [_on("async202", 0, polls=100_000)],
        "failed",
        ("offset 0", "HTTP 202", "did not finish it within 0.15s"),
        settings={"async_action_timeout": "150ms"},
    ),
    "malformed-json-once-retried": Scenario(
        lambda: [_on("malformed_json", 49, times=1)], "succeeded"
    ),
    "malformed-json-forever": Scenario(
        lambda: [_on("malformed_json", 98)],
        "partial",
        ("removals withheld", "offset 98", "body: not valid JSON"),
        lost_window=_window(98),
    ),
    "truncated-once-retried": Scenario(lambda: [_on("truncated", 147, times=1)], "succeeded"),
    "truncated-forever-on-first-page": Scenario(
        lambda: [_on("truncated", 0)],
        "failed",
        ("tenant 'tenant-1', offset 0", "truncated or malformed", "gave up after 2 retries"),
    ),
    "bad-uuid-on-a-later-page": Scenario(
        lambda: [_on("bad_uuid", 98)],
        "partial",
        ("removals withheld", "offset 98", "jobUid: not a UUID: 'not-a-uuid'"),
        lost_window=_window(98),
    ),
    "bad-uuid-on-first-page": Scenario(
        lambda: [_on("bad_uuid", 0)],
        "failed",
        ("tenant 'tenant-1', offset 0", "jobUid: not a UUID"),
    ),
    "missing-field": Scenario(
        lambda: [_on("missing_field", 49)],
        "partial",
        ("offset 49", "linkedJobUid: missing (required)"),
        lost_window=_window(49),
    ),
    "total-changes-between-pages": Scenario(
        lambda: [_on("wrong_total", 98)],
        "partial",
        ("offset 98", "meta.pagingInfo.total", "but the first page said"),
        lost_window=_window(98),
    ),
    "offset-not-echoed": Scenario(
        lambda: [_on("wrong_offset", 49)],
        "partial",
        ("offset 49", "meta.pagingInfo.offset: 0, but offset 49 was asked for"),
        lost_window=_window(49),
    ),
    "count-disagrees-with-data": Scenario(
        lambda: [_on("wrong_count", 245)],
        "partial",
        ("offset 245", "meta.pagingInfo.count"),
        lost_window=_window(245),
    ),
    "null-meta-on-a-later-page": Scenario(
        lambda: [_on("null_meta", 147)],
        "partial",
        ("offset 147", "meta.pagingInfo: missing"),
        lost_window=_window(147),
    ),
    "drift-between-pages": Scenario(
        list,
        "partial",
        ("removals withheld", "drift between offsets 0 and 49"),
        settings={"max_concurrent_pages": 1},
        after_first_page=_shift_every_position,
    ),
    "hang-once-retried": Scenario(
        lambda: [_on("hang", 49, times=1)], "succeeded", settings={"request_timeout": "300ms"}
    ),
    "hang-forever-on-a-later-page": Scenario(
        lambda: [_on("hang", 98)],
        "partial",
        ("removals withheld", "offset 98", "no answer from", "within 0.2s", "gave up"),
        settings={"request_timeout": "200ms"},
        lost_window=_window(98),
    ),
    "hang-forever-on-first-page": Scenario(
        lambda: [_on("hang", 0)],
        "failed",
        ("tenant 'tenant-1', offset 0", "no answer from", "within 0.2s"),
        settings={"request_timeout": "200ms"},
    ),
}


class _AfterFirstPage:
    """A progress sink that runs `action` once, when the run's first page has arrived."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action
        self.pages = 0

    def advance(self, tenant: str, pairs: int, total: int | None) -> None:
        self.pages += 1
        if self.pages == 1:
            self.action()


async def _sync(
    state: sim.SimulatorState,
    url: str,
    engine: AsyncEngine,
    scenario: Scenario | None = None,
    progress: _AfterFirstPage | None = None,
    **kw: Any,
) -> SyncResult:
    settings: dict[str, Any] = {"collections": ["backup_copy_job_objects"]}
    settings.update(scenario.settings if scenario else {})
    settings.update(kw)
    password = scenario.password if scenario else False
    tenant = tenant_for(state.tenants[TENANT], url, password=password, **settings)
    return await sync_tenant(tenant, engine, progress=progress)


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_fault_scenario(
    name: str,
    sim_state: sim.SimulatorState,
    simulator: str,
    sync_engine: AsyncEngine,
    engine: AsyncEngine,
) -> None:
    scenario = SCENARIOS[name]
    baseline = await _sync(sim_state, simulator, sync_engine, scenario)
    assert baseline.status == "succeeded", baseline.error
    s0 = await current_pairs(engine, TENANT)
    sim_state.remove_pairs(TENANT, 4)
    sim_state.add_pairs(TENANT, 3)
    s1 = expected_pairs(sim_state.tenants[TENANT])
    s1_items = list(sim_state.tenants[TENANT].items)

    for fault in scenario.faults():
        sim_state.inject(fault)
    hook = scenario.after_first_page
    progress = _AfterFirstPage(lambda: hook(sim_state)) if hook else None
    result = await _sync(sim_state, simulator, sync_engine, scenario, progress)

    # What the user sees: the status and an error naming the tenant and what went wrong.
    assert result.status == scenario.status, result.error
    if scenario.status == "succeeded":
        assert result.error is None
    else:
        assert result.error is not None
        for part in scenario.error_parts:
            assert part in result.error, f"{part!r} not in {result.error!r}"
    assert await run_row(engine, result.run_id) == (scenario.status, result.error, True)

    # What the database keeps.
    stored = await current_pairs(engine, TENANT)
    if scenario.status == "succeeded":
        assert stored == s1
        assert (result.added, result.removed) == (3, 4)
    elif scenario.status == "failed":
        assert stored == s0, "a failed run changed the data"
    else:
        assert result.removed == 0
        assert s0 <= stored, "a partial run removed pairs"
        ever = s0 | s1 | expected_pairs(sim_state.tenants[TENANT])
        assert stored <= ever, "pairs that VSPC never had were stored"
        if scenario.lost_window is not None:
            missing = pairs_outside(s1_items, *scenario.lost_window) - stored
            assert missing == set(), f"pairs of pages that passed were lost: {missing}"
    await assert_history_sound(engine)

    # The next run, with VSPC healthy again, heals without help.
    sim_state.clear_faults()
    healed = await _sync(sim_state, simulator, sync_engine, scenario)
    assert healed.status == "succeeded", healed.error
    assert await current_pairs(engine, TENANT) == expected_pairs(sim_state.tenants[TENANT])
    await assert_history_sound(engine)


async def test_429_storm_honours_retry_after(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    # Four 429s in a row on the first page (retryAfter in the body: 0.1 s, far above the
    # 5-20 ms backoff), then 30% of every later request throttled (Retry-After header).
    sim_state.inject(_on("429", 0, times=4, retry_after_s=0.1))
    sim_state.inject(_on("429", probability=0.3, retry_after_s=0.02, retry_after_in="header"))
    result = await _sync(sim_state, simulator, sync_engine, max_retries=10)
    assert result.status == "succeeded", result.error
    assert await current_pairs(engine, TENANT) == expected_pairs(sim_state.tenants[TENANT])
    assert sim_state.faults_fired["429"] >= 6
    first_page = [
        record.started_at
        for record in sim_state.request_log
        if record.query.get("offset") == "0" and record.path.endswith("jobObjects")
    ]
    assert len(first_page) >= 5
    gaps = [later - earlier for earlier, later in itertools.pairwise(first_page[:5])]
    assert min(gaps) >= 0.095, f"retryAfter not honoured: {gaps}"
    await assert_history_sound(engine)

    sim_state.clear_faults()
    again = await _sync(sim_state, simulator, sync_engine)
    assert (again.status, again.added, again.removed) == ("succeeded", 0, 0)


async def test_tokens_revoked_mid_snapshot_reauthenticate_with_password(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    tenant = tenant_for(sim_state.tenants[TENANT], simulator, password=True)
    assert (await sync_tenant(tenant, sync_engine)).status == "succeeded"
    sim_state.remove_pairs(TENANT, 4)
    sim_state.add_pairs(TENANT, 3)
    sim_state.reset_observations()
    # A fresh client logs in, reads page one, then every token it holds is revoked
    # (access and refresh): the refresh is refused, so it must log in with the password.
    revoker = _AfterFirstPage(lambda: sim_state.revoke_tokens(TENANT))
    result = await sync_tenant(tenant, sync_engine, progress=revoker)
    assert result.status == "succeeded", result.error
    assert (result.added, result.removed) == (3, 4)
    assert sim_state.requests_by_status[401] >= 1
    assert sim_state.token_grants["password"] == 2
    assert await current_pairs(engine, TENANT) == expected_pairs(sim_state.tenants[TENANT])
    await assert_history_sound(engine)


async def test_401_mid_snapshot_renews_with_the_refresh_token(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    sim_state.inject(_on("401", 98, times=1))
    tenant = tenant_for(sim_state.tenants[TENANT], simulator, password=True)
    result = await sync_tenant(tenant, sync_engine)
    assert result.status == "succeeded", result.error
    assert sim_state.token_grants == {"password": 1, "refresh_token": 1}
    assert await current_pairs(engine, TENANT) == expected_pairs(sim_state.tenants[TENANT])
    await assert_history_sound(engine)


async def test_token_expiring_during_a_slow_snapshot(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine, engine: AsyncEngine
) -> None:
    # VSPC says expires_in=1 (rounded up) but the token dies after 0.3 s; pages take 0.1 s
    # each, one at a time, so the token expires mid-snapshot whatever the client plans.
    sim_state.token_lifetime_s = 0.3
    sim_state.inject(_on("latency", delay_s=0.1))
    tenant = tenant_for(
        sim_state.tenants[TENANT],
        simulator,
        password=True,
        max_concurrent_pages=1,
        collections=["backup_copy_job_objects"],
    )
    result = await sync_tenant(tenant, sync_engine)
    assert result.status == "succeeded", result.error
    assert result.pages_fetched == 7
    assert sim_state.token_grants["refresh_token"] >= 1
    assert sim_state.token_grants["password"] == 1, "a refresh should have sufficed"
    assert await current_pairs(engine, TENANT) == expected_pairs(sim_state.tenants[TENANT])
    await assert_history_sound(engine)


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_simulator(
    sim_state: sim.SimulatorState, tls_ca: trustme.CA, tmp_path: Path
) -> AsyncIterator[tuple[str, Path]]:
    """`sim_state` served over HTTPS with a certificate of a private CA; (url, CA PEM path)."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_path = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_path))
    async with sim.run_simulator(sim_state, ssl_context=server_context) as url:
        yield url, ca_path


async def test_untrusted_tls_certificate_fails_and_keeps_data(
    sim_state: sim.SimulatorState,
    tls_simulator: tuple[str, Path],
    sync_engine: AsyncEngine,
    engine: AsyncEngine,
) -> None:
    url, ca_path = tls_simulator
    assert url.startswith("https://")
    trusted = dataclasses.replace(tenant_for(sim_state.tenants[TENANT], url), ca_file=ca_path)
    assert (await sync_tenant(trusted, sync_engine)).status == "succeeded"
    s0 = await current_pairs(engine, TENANT)
    sim_state.remove_pairs(TENANT, 4)
    sim_state.add_pairs(TENANT, 3)

    default_trust = tenant_for(sim_state.tenants[TENANT], url)
    assert default_trust.verify_tls and default_trust.ca_file is None
    sim_state.reset_observations()
    failed = await sync_tenant(default_trust, sync_engine)
    assert failed.status == "failed"
    assert failed.error is not None
    assert "TLS certificate" in failed.error and "is not trusted" in failed.error
    assert "set ca_file" in failed.error
    assert failed.pages_fetched == 0
    assert await current_pairs(engine, TENANT) == s0
    # The handshake failed: no request (so no credential) ever reached the server.
    assert list(sim_state.request_log) == []

    healed = await sync_tenant(trusted, sync_engine)
    assert healed.status == "succeeded", healed.error
    assert await current_pairs(engine, TENANT) == expected_pairs(sim_state.tenants[TENANT])
    await assert_history_sound(engine)


async def test_ca_file_that_is_not_a_certificate_fails_the_run(
    sim_state: sim.SimulatorState,
    tls_simulator: tuple[str, Path],
    sync_engine: AsyncEngine,
    engine: AsyncEngine,
    tmp_path: Path,
) -> None:
    url, _ = tls_simulator
    garbage = tmp_path / "not-a-ca.pem"
    garbage.write_text("this is not PEM\n")
    tenant = dataclasses.replace(tenant_for(sim_state.tenants[TENANT], url), ca_file=garbage)
    result = await sync_tenant(tenant, sync_engine)
    assert result.status == "failed"
    assert result.error is not None and "cannot load ca_file" in result.error
    assert str(garbage) in result.error
    assert await current_pairs(engine, TENANT) == set()
    await assert_history_sound(engine)
