"""The VSPC client against the simulator over real sockets, and its pure retry decisions."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
import trustme
from pydantic import SecretStr

import syncd
from syncd import config, errors, logs, paging, retry, vspc
from syncd import simulator as sim
from tests.fixtures.fault_helpers import wait_for
from tests.fixtures.helpers import tenant_for

NAME = "tenant-1"


class Observer:
    """Records what the client reports."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.retries: list[str] = []

    def request_done(self, tenant: str, code: str) -> None:
        assert tenant == NAME
        self.done.append(code)

    def retry_scheduled(self, tenant: str, reason: str) -> None:
        assert tenant == NAME
        self.retries.append(reason)


class Collector:
    """An on_page that keeps pages and checks it is never run concurrently with itself."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.pages: list[paging.Page] = []
        self.active = 0
        self.delay_s = delay_s

    async def __call__(self, page: paging.Page) -> None:
        self.active += 1
        assert self.active == 1, "on_page ran concurrently with itself"
        await asyncio.sleep(self.delay_s)
        self.pages.append(page)
        self.active -= 1

    def positions(self) -> list[paging.Pair | None]:
        total = self.pages[0].total
        result: list[paging.Pair | None] = [None] * total
        for page in self.pages:
            for index, pair in enumerate(page.pairs):
                assert result[page.offset + index] in (None, pair)
                result[page.offset + index] = pair
        return result


def sorted_pairs(sim_tenant: sim.SimTenant) -> list[paging.Pair]:
    """The tenant's pairs in the order the client asks for (missing uniqueJobUid first)."""
    items = sorted(
        sim_tenant.items,
        key=lambda item: (item["jobUid"], item["linkedJobUid"], item.get("uniqueJobUid", "")),
    )
    return [(item["jobUid"], item.get("uniqueJobUid"), item["linkedJobUid"]) for item in items]


def sim_tenant(state: sim.SimulatorState, name: str = NAME) -> sim.SimTenant:
    return state.tenants[name]


class RecordingSleep:
    """The client's clock for waits: records each requested wait and yields without waiting."""

    def __init__(self) -> None:
        self.waits_s: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits_s.append(seconds)
        await asyncio.sleep(0)


async def snapshot(
    tenant: config.Tenant,
    on_page: Callable[[paging.Page], Awaitable[None]] | None = None,
    observer: Observer | None = None,
    sleep: vspc.Sleep = asyncio.sleep,
) -> tuple[paging.SnapshotOutcome, Collector]:
    collector = Collector()
    async with vspc.open_client(tenant, observer=observer, sleep=sleep) as client:
        outcome = await client.fetch_snapshot(on_page or collector)
    return outcome, collector


def page_requests(state: sim.SimulatorState) -> list[sim.RequestRecord]:
    return [record for record in state.request_log if record.path == sim.JOB_OBJECTS_PATH]


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """syncd's logging at DEBUG, as JSON lines, into a buffer."""
    stream = io.StringIO()
    logs.configure(level="DEBUG", log_format="json", stream=stream)
    yield stream
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


# --- full snapshots ------------------------------------------------------------------------


async def test_snapshot_equals_the_dataset(sim_state: sim.SimulatorState, simulator: str) -> None:
    observer = Observer()
    collector = Collector(delay_s=0.002)
    tenant = tenant_for(sim_tenant(sim_state), simulator)
    async with vspc.open_client(tenant, observer=observer) as client:
        assert client.auth_method == "api_key"
        outcome = await client.fetch_snapshot(collector)
    assert outcome == paging.SnapshotOutcome(
        complete=True, total=300, pages_fetched=7, items_seen=300, problems=()
    )
    assert collector.positions() == sorted_pairs(sim_tenant(sim_state))
    assert sorted(page.offset for page in collector.pages) == [0, 49, 98, 147, 196, 245, 294]
    assert observer.done == ["200"] * 7 and observer.retries == []


async def test_every_request_carries_the_headers_and_query(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    for password in (False, True):
        tenant = tenant_for(sim_tenant(sim_state), simulator, password=password)
        outcome, _ = await snapshot(tenant)
        assert outcome.complete
    records = list(sim_state.request_log)
    assert len(records) == 7 + 1 + 7  # api key pages, one token grant, password pages
    request_ids = set()
    for record in records:
        headers = record.headers
        assert headers["X-Client-Version"] == "3.6"
        assert headers["Accept"] == "application/json"
        assert headers["User-Agent"] == f"syncd/{syncd.__version__}"
        request_ids.add(str(uuid.UUID(headers["X-Request-id"])))
        if record.path == sim.JOB_OBJECTS_PATH:
            assert headers["Authorization"] == "Bearer [redacted]"
            assert record.query["sort"] == paging.SORT_PARAM
            assert record.query["limit"] == "50"
            assert int(record.query["offset"]) % 49 == 0
        else:
            assert record.path == sim.TOKEN_PATH and "Authorization" not in headers
    assert len(request_ids) == len(records)
    assert {record.credential for record in page_requests(sim_state)} == {
        "api_key",
        "access_token",
    }


async def test_fetch_first_page(sim_state: sim.SimulatorState, simulator: str) -> None:
    tenant = tenant_for(sim_tenant(sim_state), simulator, password=True)
    async with vspc.open_client(tenant) as client:
        assert client.auth_method == "password"
        page = await client.fetch_first_page()
    assert page.total == 300 and page.pairs == sorted_pairs(sim_tenant(sim_state))[:1]
    assert page_requests(sim_state)[0].query["limit"] == "1"


async def test_empty_collection(sim_state: sim.SimulatorState, simulator: str) -> None:
    sim_tenant(sim_state).items.clear()
    sim_state.invalidate()
    outcome, collector = await snapshot(tenant_for(sim_tenant(sim_state), simulator))
    assert outcome == paging.SnapshotOutcome(True, 0, 1, 0, ())
    assert [page.pairs for page in collector.pages] == [[]]


async def test_the_smallest_page_size(sim_state: sim.SimulatorState, simulator: str) -> None:
    del sim_tenant(sim_state).items[5:]
    sim_state.invalidate()
    tenant = tenant_for(sim_tenant(sim_state), simulator, page_size=2)
    outcome, collector = await snapshot(tenant)
    assert outcome.complete and outcome.pages_fetched == 4  # 0-1, 1-2, 2-3, 3-4
    assert collector.positions() == sorted_pairs(sim_tenant(sim_state))


async def test_concurrency_is_bounded(sim_state: sim.SimulatorState, simulator: str) -> None:
    sim_state.inject(sim.Fault("latency", tenant=NAME, times=None, delay_s=0.03))
    tenant = tenant_for(sim_tenant(sim_state), simulator, page_size=20, max_concurrent_pages=3)
    outcome, collector = await snapshot(tenant)
    assert outcome.complete and outcome.pages_fetched == 16
    assert collector.positions() == sorted_pairs(sim_tenant(sim_state))
    assert sim_state.max_in_flight[NAME] == 3


async def test_on_page_failure_cancels_fetches_and_propagates(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    sim_state.inject(sim.Fault("latency", tenant=NAME, times=None, delay_s=0.05))
    tenant = tenant_for(sim_tenant(sim_state), simulator, page_size=10)

    class Stop(Exception):
        pass

    async def on_page(page: paging.Page) -> None:
        if page.offset != 0:
            raise Stop

    with pytest.raises(Stop):
        await snapshot(tenant, on_page=on_page)
    # fetch_snapshot awaited its cancelled workers before raising: no task is left to send.
    sent = len(sim_state.request_log)
    assert sent < 10  # 34 pages planned

    async def server_idle() -> bool:
        return sim_state.in_flight[NAME] == 0

    await wait_for(server_idle, what="the simulator to see the cancelled requests go")
    assert len(sim_state.request_log) == sent


# --- retries -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["body", "header"])
async def test_429_honours_retry_after(
    sim_state: sim.SimulatorState, simulator: str, where: str
) -> None:
    sim_state.inject(
        sim.Fault("429", tenant=NAME, offset=49, times=2, retry_after_s=0.25, retry_after_in=where)
    )
    observer = Observer()
    sleep = RecordingSleep()
    tenant = tenant_for(sim_tenant(sim_state), simulator)
    outcome, _ = await snapshot(tenant, observer=observer, sleep=sleep)
    assert outcome.complete
    assert sleep.waits_s == [0.25, 0.25]  # the server's wait, not the (shorter) backoff
    assert observer.retries == ["429", "429"]
    assert observer.done.count("429") == 2


async def test_retry_after_is_capped(sim_state: sim.SimulatorState, simulator: str) -> None:
    sim_state.inject(
        sim.Fault("429", tenant=NAME, offset=49, retry_after_s=3600, retry_after_in="both")
    )
    tenant = tenant_for(sim_tenant(sim_state), simulator, retry_after_max="100ms")
    sleep = RecordingSleep()
    outcome, _ = await snapshot(tenant, sleep=sleep)
    assert outcome.complete
    assert sleep.waits_s == [0.1]  # an hour asked for, retry_after_max given


async def test_520_is_retried(sim_state: sim.SimulatorState, simulator: str) -> None:
    sim_state.inject(sim.Fault("520", tenant=NAME, offset=98, times=2))
    observer = Observer()
    outcome, collector = await snapshot(
        tenant_for(sim_tenant(sim_state), simulator), observer=observer
    )
    assert outcome.complete
    assert collector.positions() == sorted_pairs(sim_tenant(sim_state))
    assert observer.retries == ["520", "520"]


async def test_proxy_5xx_is_retried(sim_state: sim.SimulatorState, simulator: str) -> None:
    sim_state.inject(
        sim.Fault("status", tenant=NAME, offset=49, status=503, error_type="unspecified")
    )
    observer = Observer()
    outcome, _ = await snapshot(tenant_for(sim_tenant(sim_state), simulator), observer=observer)
    assert outcome.complete and observer.retries == ["520"]


async def test_retries_exhausted_make_the_snapshot_incomplete(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    sim_state.inject(sim.Fault("520", tenant=NAME, offset=98, times=None))
    observer = Observer()
    outcome, collector = await snapshot(
        tenant_for(sim_tenant(sim_state), simulator, max_retries=3), observer=observer
    )
    assert not outcome.complete
    assert outcome.pages_fetched == 6 and len(collector.pages) == 6
    assert observer.retries == ["520"] * 3
    assert outcome.problems[0] == (
        f"tenant {NAME!r}, offset 98: HTTP 520: Internal server error (gave up after 3 retries)"
    )
    assert f"tenant {NAME!r}: positions 99..146 of 300" in outcome.problems[1]


async def test_retries_exhausted_on_the_first_page_raise(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    sim_state.inject(sim.Fault("520", tenant=NAME, offset=0, times=None))
    with pytest.raises(errors.RetriesExhausted) as caught:
        await snapshot(tenant_for(sim_tenant(sim_state), simulator))
    assert str(caught.value) == (
        f"tenant {NAME!r}, offset 0: HTTP 520: Internal server error (gave up after 2 retries)"
    )
    assert caught.value.status == 520
    assert isinstance(caught.value, errors.TenantError)


async def test_logical_server_error_is_not_retried(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    sim_state.inject(sim.Fault("520", tenant=NAME, offset=49, times=None, error_type="logical"))
    observer = Observer()
    outcome, _ = await snapshot(tenant_for(sim_tenant(sim_state), simulator), observer=observer)
    assert not outcome.complete and observer.retries == []
    assert outcome.problems[0] == f"tenant {NAME!r}, offset 49: HTTP 520: Internal server error"


@pytest.mark.parametrize("status", [400, 403, 409, 415])
async def test_client_errors_are_not_retried(
    sim_state: sim.SimulatorState, simulator: str, status: int
) -> None:
    kind = "403" if status == 403 else "status"
    sim_state.inject(sim.Fault(kind, tenant=NAME, offset=0, status=status, times=None))
    observer = Observer()
    with pytest.raises(errors.ApiError) as caught:
        await snapshot(tenant_for(sim_tenant(sim_state), simulator), observer=observer)
    assert caught.value.status == status
    assert str(caught.value).startswith(f"tenant {NAME!r}, offset 0: HTTP {status}: ")
    assert ("Access denied" if status == 403 else f"Simulated error {status}") in str(caught.value)
    assert observer.done == [str(status)] and observer.retries == []


async def test_a_404_first_page_means_the_collection_is_unavailable(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    sim_state.inject(sim.Fault("status", tenant=NAME, offset=0, status=404, times=None))
    observer = Observer()
    with pytest.raises(errors.CollectionUnavailable) as caught:
        await snapshot(tenant_for(sim_tenant(sim_state), simulator), observer=observer)
    assert caught.value.collection == "backup_copy_job_objects"
    assert "HTTP 404" in str(caught.value) and "older VSPC" in str(caught.value)
    assert isinstance(caught.value.__cause__, errors.ResourceMissing)
    assert observer.done == ["404"] and observer.retries == []


async def test_a_404_later_page_makes_the_snapshot_incomplete(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    sim_state.inject(sim.Fault("status", tenant=NAME, offset=147, status=404))
    outcome, _ = await snapshot(tenant_for(sim_tenant(sim_state), simulator))
    assert not outcome.complete
    assert outcome.problems[0].startswith(f"tenant {NAME!r}, offset 147: HTTP 404")


async def test_later_page_client_error_makes_snapshot_incomplete(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    sim_state.inject(sim.Fault("403", tenant=NAME, offset=147))
    outcome, collector = await snapshot(tenant_for(sim_tenant(sim_state), simulator))
    assert not outcome.complete and len(collector.pages) == 6
    assert outcome.problems[0].startswith(f"tenant {NAME!r}, offset 147: HTTP 403: Access denied")


async def test_timeouts_are_retried(sim_state: sim.SimulatorState, simulator: str) -> None:
    sim_state.inject(sim.Fault("hang", tenant=NAME, offset=49))
    observer = Observer()
    tenant = tenant_for(sim_tenant(sim_state), simulator, request_timeout="300ms")
    outcome, _ = await snapshot(tenant, observer=observer)
    assert outcome.complete
    assert observer.retries == ["timeout"] and observer.done.count("timeout") == 1


async def test_timeouts_exhausted(sim_state: sim.SimulatorState, simulator: str) -> None:
    sim_state.inject(sim.Fault("hang", tenant=NAME, offset=0, times=None))
    tenant = tenant_for(sim_tenant(sim_state), simulator, request_timeout="200ms", max_retries=1)
    with pytest.raises(errors.RetriesExhausted, match=r"offset 0: no answer from .* within 0.2s"):
        await snapshot(tenant)


@pytest.mark.parametrize("kind", ["malformed_json", "truncated"])
async def test_unreadable_body_is_retried(
    sim_state: sim.SimulatorState, simulator: str, kind: str
) -> None:
    sim_state.inject(sim.Fault(kind, tenant=NAME, offset=49))
    observer = Observer()
    outcome, collector = await snapshot(
        tenant_for(sim_tenant(sim_state), simulator), observer=observer
    )
    assert outcome.complete and observer.retries == ["malformed_body"]
    assert collector.positions() == sorted_pairs(sim_tenant(sim_state))


@pytest.mark.parametrize("kind", ["malformed_json", "truncated"])
async def test_unreadable_body_every_time(
    sim_state: sim.SimulatorState, simulator: str, kind: str
) -> None:
    sim_state.inject(sim.Fault(kind, tenant=NAME, offset=49, times=None))
    outcome, _ = await snapshot(tenant_for(sim_tenant(sim_state), simulator))
    assert not outcome.complete
    assert outcome.problems[0].startswith(f"tenant {NAME!r}, offset 49: body: not valid JSON")


async def test_connection_refused(sim_state: sim.SimulatorState) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    observer = Observer()
    tenant = tenant_for(sim_tenant(sim_state), url, max_retries=1)
    with pytest.raises(errors.RetriesExhausted) as caught:
        await snapshot(tenant, observer=observer)
    assert str(caught.value) == (
        f"tenant {NAME!r}, offset 0: cannot connect to {url}: connection refused "
        "(gave up after 1 retry)"
    )
    assert observer.done == ["connection_error"] * 2


async def test_unknown_host(sim_state: sim.SimulatorState) -> None:
    url = "https://no-such-host.invalid:1280"
    tenant = tenant_for(sim_tenant(sim_state), url, max_retries=0)
    with pytest.raises(errors.RetriesExhausted) as caught:
        await snapshot(tenant)
    assert str(caught.value).startswith(
        f"tenant {NAME!r}, offset 0: cannot connect to {url}: cannot resolve host name "
        "'no-such-host.invalid' ("
    )
    assert str(caught.value).endswith("(not retried: max_retries is 0)")


# --- async actions ---------------------------------------------------------------------


async def test_202_is_polled(sim_state: sim.SimulatorState, simulator: str) -> None:
    sim_state.inject(sim.Fault("async202", tenant=NAME, offset=49, polls=2))
    outcome, collector = await snapshot(tenant_for(sim_tenant(sim_state), simulator))
    assert outcome.complete
    assert collector.positions() == sorted_pairs(sim_tenant(sim_state))
    polls = [record for record in sim_state.request_log if "asyncActions" in record.path]
    assert [record.status for record in polls] == [202, 202, 200]
    assert all(record.headers["Authorization"] == "Bearer [redacted]" for record in polls)


async def test_202_that_never_finishes(sim_state: sim.SimulatorState, simulator: str) -> None:
    sim_state.inject(sim.Fault("async202", tenant=NAME, offset=49, polls=1000))
    tenant = tenant_for(sim_tenant(sim_state), simulator, async_action_timeout="200ms")
    outcome, _ = await snapshot(tenant)
    assert not outcome.complete
    assert outcome.problems[0] == (
        f"tenant {NAME!r}, offset 49: VSPC queued the request (HTTP 202) and did not finish "
        "it within 0.2s"
    )


# --- page checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("bad_uuid", "data[25].jobUid: not a UUID"),
        ("missing_field", "data[25].linkedJobUid: missing"),
        ("wrong_total", "meta.pagingInfo.total: 307, but the first page said 300"),
        ("wrong_offset", "meta.pagingInfo.offset: 0, but offset 49 was asked for"),
        ("wrong_count", "meta.pagingInfo.count: 51, but data holds 50 items"),
        ("null_meta", "meta.pagingInfo: missing"),
    ],
)
async def test_page_checks_make_the_snapshot_incomplete(
    sim_state: sim.SimulatorState, simulator: str, kind: str, field: str
) -> None:
    sim_state.inject(sim.Fault(kind, tenant=NAME, offset=49))
    observer = Observer()
    outcome, collector = await snapshot(
        tenant_for(sim_tenant(sim_state), simulator), observer=observer
    )
    assert not outcome.complete
    assert outcome.problems[0].startswith(f"tenant {NAME!r}, offset 49: {field}")
    assert len(collector.pages) == 6 and observer.retries == []  # the other pages are delivered


async def test_bad_first_page_raises(sim_state: sim.SimulatorState, simulator: str) -> None:
    sim_state.inject(sim.Fault("bad_uuid", tenant=NAME, offset=0))
    with pytest.raises(errors.PageProblem, match=r"offset 0: data\[25\]\.jobUid: not a UUID"):
        await snapshot(tenant_for(sim_tenant(sim_state), simulator))


async def test_null_meta_on_a_full_first_page(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    sim_state.inject(sim.Fault("null_meta", tenant=NAME, offset=0))
    outcome, collector = await snapshot(tenant_for(sim_tenant(sim_state), simulator))
    assert not outcome.complete and outcome.total is None
    assert (
        "offset 0: meta.pagingInfo: missing (meta is null) and the page is full"
        in (outcome.problems[0])
    )
    assert len(collector.pages) == 1


async def test_null_meta_on_a_short_single_page(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    del sim_tenant(sim_state).items[30:]
    sim_state.invalidate()
    sim_state.inject(sim.Fault("null_meta", tenant=NAME, offset=0))
    outcome, collector = await snapshot(tenant_for(sim_tenant(sim_state), simulator))
    assert outcome == paging.SnapshotOutcome(True, 30, 1, 30, ())
    assert collector.positions() == sorted_pairs(sim_tenant(sim_state))


async def test_drift_is_detected(sim_state: sim.SimulatorState, simulator: str) -> None:
    items = sim_tenant(sim_state).items
    first_sorted = sorted_pairs(sim_tenant(sim_state))[0]
    pages_seen = []

    async def on_page(page: paging.Page) -> None:
        pages_seen.append(page.offset)
        if len(pages_seen) == 2:
            # Mid-snapshot, the first item goes and one sorting last arrives: same total,
            # every later position shifts by one.
            items[:] = [item for item in items if item["jobUid"] != first_sorted[0]]
            while len(items) < 300:
                items.append(
                    {
                        "jobUid": f"ffffffff-ffff-4fff-8fff-{len(items):012x}",
                        "linkedJobUid": str(uuid.uuid4()),
                    }
                )
            sim_state.invalidate(NAME)

    tenant = tenant_for(sim_tenant(sim_state), simulator, max_concurrent_pages=1)
    outcome, _ = await snapshot(tenant, on_page=on_page)
    assert not outcome.complete
    assert outcome.total == 300
    assert any(
        problem.startswith(f"tenant {NAME!r}: drift between offsets ")
        for problem in outcome.problems
    ), outcome.problems


# --- authentication ------------------------------------------------------------------------


async def test_password_grant(sim_state: sim.SimulatorState, simulator: str) -> None:
    tenant = tenant_for(sim_tenant(sim_state), simulator, password=True)
    outcome, collector = await snapshot(tenant)
    assert outcome.complete
    assert collector.positions() == sorted_pairs(sim_tenant(sim_state))
    assert sim_state.token_grants == {"password": 1}
    assert {record.credential for record in page_requests(sim_state)} == {"access_token"}


async def test_token_refreshed_before_expiry(simulator: str, sim_state: sim.SimulatorState) -> None:
    sim_state.token_lifetime_s = 1.0  # the default 300 s margin is capped to 0.5 s
    sim_state.inject(sim.Fault("latency", tenant=NAME, times=None, delay_s=0.1))
    tenant = tenant_for(
        sim_tenant(sim_state), simulator, password=True, page_size=20, max_concurrent_pages=2
    )
    outcome, _ = await snapshot(tenant)
    assert outcome.complete
    assert sim_state.token_grants["password"] == 1
    assert sim_state.token_grants["refresh_token"] >= 1
    assert sim_state.requests_by_status[401] == 0  # refreshed before VSPC refused it


async def test_revoked_tokens_are_renewed_once(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    sim_state.inject(sim.Fault("latency", tenant=NAME, times=None, delay_s=0.02))
    tenant = tenant_for(sim_tenant(sim_state), simulator, password=True, page_size=20)
    observer = Observer()
    revoked = False

    async def on_page(page: paging.Page) -> None:
        nonlocal revoked
        if not revoked:
            revoked = True
            sim_state.revoke_tokens(NAME)  # refresh tokens too: back to the password grant

    outcome, _ = await snapshot(tenant, on_page=on_page, observer=observer)
    assert outcome.complete
    assert sim_state.requests_by_status[401] >= 2  # several pages in flight saw it
    # One shared renewal: the refresh is refused, one new password grant.
    assert sim_state.token_grants == {"password": 2}
    assert observer.retries.count("401") == sim_state.requests_by_status[401]


async def test_refresh_tokens_rotate(sim_state: sim.SimulatorState, simulator: str) -> None:
    sim_state.inject(sim.Fault("401", tenant=NAME, offset=49))
    sim_state.inject(sim.Fault("401", tenant=NAME, offset=98))
    tenant = tenant_for(sim_tenant(sim_state), simulator, password=True, max_concurrent_pages=1)
    outcome, _ = await snapshot(tenant)
    assert outcome.complete
    # The second refresh only works with the refresh token the first one returned.
    assert sim_state.token_grants == {"password": 1, "refresh_token": 2}


async def test_401_after_renewal_is_an_auth_error(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    sim_state.inject(sim.Fault("401", tenant=NAME, offset=0, times=2))
    tenant = tenant_for(sim_tenant(sim_state), simulator, password=True)
    with pytest.raises(errors.AuthError) as caught:
        await snapshot(tenant)
    assert str(caught.value) == (
        f"tenant {NAME!r}, offset 0: still refused after renewing the access token "
        "(HTTP 401: Authentication failed: token was revoked)"
    )


async def test_auth_error_mid_snapshot_ends_it(
    sim_state: sim.SimulatorState, simulator: str
) -> None:
    sim_state.inject(sim.Fault("401", tenant=NAME, offset=147, times=2))
    tenant = tenant_for(sim_tenant(sim_state), simulator, password=True)
    with pytest.raises(errors.AuthError, match="offset 147: still refused"):
        await snapshot(tenant)


async def test_bad_api_key(sim_state: sim.SimulatorState, simulator: str) -> None:
    tenant = tenant_for(sim_tenant(sim_state), simulator)
    tenant = config.Tenant(
        tenant.name,
        tenant.url,
        config.ApiKeyAuth(SecretStr("nope-not-a-key")),
        True,
        None,
        tenant.settings,
    )
    with pytest.raises(errors.AuthError) as caught:
        await snapshot(tenant)
    assert str(caught.value) == (
        f"tenant {NAME!r}, offset 0: the API key was refused "
        "(HTTP 401: Authentication failed: missing or invalid token)"
    )
    assert len(sim_state.request_log) == 1


async def test_bad_password(sim_state: sim.SimulatorState, simulator: str) -> None:
    tenant = tenant_for(sim_tenant(sim_state), simulator, password=True)
    sim_tenant(sim_state).password = "changed-on-the-server"
    with pytest.raises(errors.AuthError) as caught:
        await snapshot(tenant)
    assert str(caught.value) == (
        f"tenant {NAME!r}, token (password grant): credentials refused (HTTP 400: "
        "invalid_grant: Cannot complete login due to incorrect username or password, or no "
        "sufficient rights.)"
    )


async def test_mfa_account(sim_state: sim.SimulatorState, simulator: str) -> None:
    sim_tenant(sim_state).mfa = True
    tenant = tenant_for(sim_tenant(sim_state), simulator, password=True)
    with pytest.raises(errors.AuthError) as caught:
        async with vspc.open_client(tenant) as client:
            await client.fetch_first_page()
    message = str(caught.value)
    assert f"tenant {NAME!r}" in message
    assert "uses multi-factor authentication (MFA)" in message
    assert "configure an api_key" in message


async def test_token_endpoint_retries(sim_state: sim.SimulatorState, simulator: str) -> None:
    sim_state.inject(sim.Fault("520", times=1))  # no offset: the token endpoint gets it
    observer = Observer()
    tenant = tenant_for(sim_tenant(sim_state), simulator, password=True)
    outcome, _ = await snapshot(tenant, observer=observer)
    assert outcome.complete and observer.retries == ["520"]


async def test_unsupported_api_version(sim_state: sim.SimulatorState, simulator: str) -> None:
    tenant = tenant_for(sim_tenant(sim_state), simulator, client_version="9.9")
    with pytest.raises(errors.ApiError) as caught:
        await snapshot(tenant)
    message = str(caught.value)
    assert "does not support API version '9.9'" in message
    assert "set client_version to a version the server supports" in message
    assert "supported versions: 3.6, 3.5" in message  # the server's own message


# --- TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def https_simulator(sim_state: sim.SimulatorState, tls_ca: trustme.CA) -> AsyncIterator[str]:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    async with sim.run_simulator(sim_state, ssl_context=server_context) as url:
        yield url


def _tls_tenant(
    sim_state: sim.SimulatorState, url: str, *, verify: bool = True, ca_file: Path | None = None
) -> config.Tenant:
    base = tenant_for(sim_tenant(sim_state), url)
    return config.Tenant(base.name, url, base.auth, verify, ca_file, base.settings)


async def test_tls_untrusted_certificate(
    sim_state: sim.SimulatorState, https_simulator: str
) -> None:
    observer = Observer()
    with pytest.raises(errors.TransportError) as caught:
        await snapshot(_tls_tenant(sim_state, https_simulator), observer=observer)
    message = str(caught.value)
    assert message.startswith(
        f"tenant {NAME!r}, offset 0: the TLS certificate of {https_simulator}"
    )
    assert "set ca_file" in message
    assert observer.done == ["tls_error"]  # not retried


async def test_tls_with_ca_file(
    sim_state: sim.SimulatorState, https_simulator: str, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    outcome, _ = await snapshot(_tls_tenant(sim_state, https_simulator, ca_file=ca_file))
    assert outcome.complete


async def test_tls_unreadable_ca_file(sim_state: sim.SimulatorState, tmp_path: Path) -> None:
    tenant = _tls_tenant(sim_state, "https://127.0.0.1:1", ca_file=tmp_path / "missing.pem")
    with pytest.raises(errors.TransportError, match="cannot load ca_file"):
        await snapshot(tenant)


async def test_tls_verification_disabled(
    sim_state: sim.SimulatorState, https_simulator: str, captured_logs: io.StringIO
) -> None:
    outcome, _ = await snapshot(_tls_tenant(sim_state, https_simulator, verify=False))
    assert outcome.complete
    lines = [orjson.loads(line) for line in captured_logs.getvalue().splitlines()]
    warnings = [line for line in lines if "TLS verification disabled" in line["event"]]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["event"] == f"TLS verification disabled for tenant {NAME}"


# --- secrets -------------------------------------------------------------------------------


async def test_secrets_stay_out_of_logs_and_errors(
    sim_state: sim.SimulatorState, simulator: str, captured_logs: io.StringIO
) -> None:
    account = sim_tenant(sim_state)
    sim_state.token_lifetime_s = 0.4
    sim_state.inject(sim.Fault("latency", tenant=NAME, times=None, delay_s=0.03))
    sim_state.inject(sim.Fault("401", tenant=NAME, offset=95))
    password_tenant = tenant_for(account, simulator, password=True, page_size=20)
    key_tenant = tenant_for(account, simulator)
    async with vspc.open_client(password_tenant) as client:
        assert (await client.fetch_snapshot(Collector())).complete
        texts = [repr(client), repr(client._auth)]
    async with vspc.open_client(key_tenant) as client:
        assert (await client.fetch_snapshot(Collector())).complete
        texts += [repr(client), repr(client._auth)]
    sim_state.inject(sim.Fault("401", tenant=NAME, offset=0, times=2))
    with pytest.raises(errors.AuthError) as caught:
        await snapshot(password_tenant)
    texts += errors.cause_chain(caught.value)
    account.password = "something-else"
    with pytest.raises(errors.AuthError) as caught:
        await snapshot(password_tenant)
    texts += errors.cause_chain(caught.value)

    output = captured_logs.getvalue()
    assert sim_state.token_grants["refresh_token"] >= 2
    assert output.count('"vspc request"') >= 30 and '"request_id"' in output
    for text in [output, *texts]:
        assert account.api_key not in text
        assert password_tenant.auth.password.get_secret_value() not in text  # type: ignore[union-attr]
        assert "sim-at-" not in text and "sim-rt-" not in text  # the simulator's tokens


# --- pure retry decisions --------------------------------------------------------------------


def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    for retry_number in range(12):
        ceiling = min(2.0, 0.01 * 2**retry_number)
        assert retry.backoff_s(retry_number, base_s=0.01, cap_s=2.0, jitter=0.0) == 0.0
        high = retry.backoff_s(retry_number, base_s=0.01, cap_s=2.0, jitter=0.999999)
        assert ceiling * 0.999 < high < ceiling
        assert retry.backoff_s(retry_number, base_s=0.01, cap_s=2.0, jitter=0.5) == ceiling / 2
    assert retry.backoff_s(10_000, base_s=1.0, cap_s=60.0, jitter=0.5) == 30.0


def test_delay_prefers_retry_after_and_caps_it() -> None:
    common: dict[str, Any] = {"base_s": 1.0, "cap_s": 60.0, "retry_after_max_s": 300.0}
    assert retry.delay_s(0, retry_after_s=25.0, jitter=0.1, **common) == 25.0
    assert retry.delay_s(0, retry_after_s=1000.0, jitter=0.1, **common) == 300.0
    assert retry.delay_s(0, retry_after_s=0.0, jitter=0.9, **common) == 0.0
    assert retry.delay_s(3, retry_after_s=None, jitter=0.5, **common) == 4.0


def test_parse_error_body() -> None:
    body = orjson.dumps(
        {
            "errors": [
                {
                    "message": "Too many requests",
                    "type": "transport",
                    "code": 429,
                    "retryAfter": 25,
                },
                {"message": "again", "type": "retryableLogical", "code": 1, "retryAfter": "30"},
            ]
        }
    )
    assert retry.parse_error_body(body) == retry.ErrorBody(
        message="Too many requests; again",
        types=("transport", "retryableLogical"),
        retry_after_s=30.0,
    )
    assert retry.parse_error_body(
        b'{"error": {"code": "UnsupportedApiVersion", "message": "no"}}'
    ) == retry.ErrorBody(message="no", code="UnsupportedApiVersion")
    for garbage in (b"", b"<html>", b"[]", b'{"errors": "x"}', b'{"errors": [1, null]}'):
        assert retry.parse_error_body(garbage) == retry.ErrorBody()
    bad_retry_after = b'{"errors": [{"type": "transport", "retryAfter": -5}]}'
    assert retry.parse_error_body(bad_retry_after).retry_after_s is None


@pytest.mark.parametrize(
    ("status", "types", "code", "verdict"),
    [
        (429, (), None, retry.Verdict.RETRY),
        (520, ("transport",), None, retry.Verdict.RETRY),
        (520, (), None, retry.Verdict.RETRY),
        (520, ("unspecified",), None, retry.Verdict.RETRY),
        (520, ("logical",), None, retry.Verdict.FAIL),
        (520, ("security",), None, retry.Verdict.FAIL),
        (502, (), None, retry.Verdict.RETRY),
        (503, ("logical", "transport"), None, retry.Verdict.RETRY),
        (408, (), None, retry.Verdict.RETRY),
        (401, ("security",), None, retry.Verdict.REAUTHENTICATE),
        (400, ("retryableLogical",), None, retry.Verdict.FAIL),
        (403, (), None, retry.Verdict.FAIL),
        (404, (), None, retry.Verdict.FAIL),
        (409, ("transport",), None, retry.Verdict.FAIL),
        (415, (), None, retry.Verdict.FAIL),
        (423, ("retryableLogical",), None, retry.Verdict.RETRY),
        (423, ("logical",), None, retry.Verdict.FAIL),
        (302, (), None, retry.Verdict.FAIL),
        (400, (), "UnsupportedApiVersion", retry.Verdict.UNSUPPORTED_VERSION),
    ],
)
def test_classify(
    status: int, types: tuple[str, ...], code: str | None, verdict: retry.Verdict
) -> None:
    assert retry.classify(status, retry.ErrorBody(types=types, code=code)) is verdict


def test_parse_retry_after_header() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert retry.parse_retry_after_header("25", now=now) == 25.0
    assert retry.parse_retry_after_header(" 1.5 ", now=now) == 1.5
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert retry.parse_retry_after_header(later, now=now) == 90.0
    earlier = format_datetime(now - timedelta(seconds=90), usegmt=True)
    assert retry.parse_retry_after_header(earlier, now=now) == 0.0
    for bad in (None, "", "soon", "-3", "nan", "inf"):
        assert retry.parse_retry_after_header(bad, now=now) is None


@pytest.mark.parametrize(
    ("lifetime_s", "margin_s", "after_s"),
    [(3600, 300, 3300), (60, 300, 30), (1, 300, 0.5), (600, 300, 300)],
)
def test_token_refresh_after(lifetime_s: float, margin_s: float, after_s: float) -> None:
    assert vspc.token_refresh_after_s(lifetime_s, margin_s) == after_s
