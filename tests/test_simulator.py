"""The VSPC simulator, spoken to over real sockets with a plain aiohttp client."""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import trustme

from syncd import simulator as sim
from syncd.simulator import faults

JOB_OBJECTS = sim.JOB_OBJECTS_PATH
FULL_SORT = orjson.dumps(
    [
        {"property": "jobUid", "direction": "ascending"},
        {"property": "linkedJobUid", "direction": "ascending"},
        {"property": "uniqueJobUid", "direction": "ascending"},
    ]
).decode()


def pair_key(item: dict[str, str]) -> tuple[str, str, str | None]:
    return item["jobUid"], item["linkedJobUid"], item.get("uniqueJobUid")


def headers_for(credential: str | None = None, version: str | None = "3.6") -> dict[str, str]:
    headers = {}
    if version is not None:
        headers["X-Client-Version"] = version
    if credential is not None:
        headers["Authorization"] = f"Bearer {credential}"
    return headers


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Api:
    """A few helpers bound to one running simulator."""

    def __init__(self, http: aiohttp.ClientSession, url: str, state: sim.SimulatorState) -> None:
        self.http = http
        self.url = url
        self.state = state

    def key(self, tenant: str = "tenant-1") -> str:
        return self.state.tenants[tenant].api_key

    async def get(
        self, path: str = JOB_OBJECTS, *, tenant: str = "tenant-1", **params: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        query = {name: str(value) for name, value in params.items()}
        async with self.http.get(
            self.url + path, params=query, headers=headers_for(self.key(tenant))
        ) as response:
            raw = await response.read()
            try:
                body = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                body = raw
            return response.status, body, response

    async def token(self, form: dict[str, str], version: str | None = "3.6") -> tuple[int, Any]:
        async with self.http.post(
            self.url + sim.TOKEN_PATH, data=form, headers=headers_for(None, version)
        ) as response:
            return response.status, await response.json()

    async def all_sorted(self, tenant: str = "tenant-1", limit: int = 70) -> list[dict[str, str]]:
        items: list[dict[str, str]] = []
        offset = 0
        while True:
            status, body, _ = await self.get(
                tenant=tenant, limit=limit, offset=offset, sort=FULL_SORT
            )
            assert status == 200
            items.extend(body["data"])
            offset += limit
            if offset >= body["meta"]["pagingInfo"]["total"]:
                return items


@pytest.fixture
def api(http: aiohttp.ClientSession, simulator: str, sim_state: sim.SimulatorState) -> Api:
    return Api(http, simulator, sim_state)


# --- dataset ---------------------------------------------------------------------------------


def test_dataset_is_deterministic_and_shaped() -> None:
    first = sim.make_dataset(tenants=2, pairs_per_tenant=500, seed=7)
    again = sim.make_dataset(tenants=2, pairs_per_tenant=500, seed=7)
    other = sim.make_dataset(tenants=2, pairs_per_tenant=500, seed=8)
    assert [(t.api_key, t.password, t.items) for t in first] == [
        (t.api_key, t.password, t.items) for t in again
    ]
    assert first[0].items != other[0].items
    assert first[0].api_key != other[0].api_key
    assert [t.name for t in first] == ["tenant-1", "tenant-2"]
    assert [t.username for t in first] == ["tenant-1-user", "tenant-2-user"]
    assert first[0].api_key.startswith("sim-key-tenant-1-")
    assert first[0].api_key != first[1].api_key
    for tenant in first:
        assert len(tenant.items) == 500
        assert len({pair_key(item) for item in tenant.items}) == 500
        for item in tenant.items:
            assert set(item) <= {"jobUid", "linkedJobUid", "uniqueJobUid"}
            for value in item.values():
                assert str(uuid.UUID(value)) == value
                assert uuid.UUID(value).version == 4
    assert "password" not in repr(first[0]) and first[0].api_key not in repr(first[0])


def test_dataset_copy_jobs_and_quirks() -> None:
    (tenant,) = sim.make_dataset(tenants=1, pairs_per_tenant=20_000, seed=3)
    links: dict[tuple[str, str | None], int] = collections.Counter(
        (item["jobUid"], item.get("uniqueJobUid")) for item in tenant.items
    )
    # The last copy job may have been cut short by the exact pair count.
    assert all(1 <= count <= 5 for count in links.values())
    uniques_by_job: dict[str, set[str | None]] = collections.defaultdict(set)
    for job_uid, unique in links:
        uniques_by_job[job_uid].add(unique)
    with_unique = sum(1 for uniques in uniques_by_job.values() if None not in uniques)
    assert 0.85 < with_unique / len(uniques_by_job) < 0.95
    twice = [job for job, uniques in uniques_by_job.items() if len(uniques) == 2]
    assert 0.001 < len(twice) / len(uniques_by_job) < 0.01
    assert all(None not in uniques_by_job[job] for job in twice)
    sources = collections.Counter(item["linkedJobUid"] for item in tenant.items)
    assert max(sources.values()) > 1  # some source jobs feed several copy jobs


def test_fault_rejects_typos() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        sim.Fault("500")
    with pytest.raises(ValueError, match="status="):
        sim.Fault("status")
    state = sim.SimulatorState(sim.make_dataset(tenants=1, pairs_per_tenant=1))
    with pytest.raises(ValueError, match="unknown tenant"):
        state.inject(sim.Fault("520", tenant="nobody"))


def test_every_fault_kind_but_latency_has_its_handler() -> None:
    # Latency never answers a request: it delays whatever does.
    assert set(faults.HANDLERS) == set(sim.FaultKind) - {sim.FaultKind.LATENCY}
    assert sim.Fault("429").kind is sim.FaultKind.THROTTLED
    assert sim.Fault(sim.FaultKind.DRIFT).kind == "drift"


# --- auth and headers ------------------------------------------------------------------------


async def test_api_key_page(api: Api) -> None:
    status, body, response = await api.get()
    assert status == 200
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert body["meta"]["pagingInfo"] == {"total": 300, "count": 100, "offset": 0}
    assert len(body["data"]) == 100
    assert body["errors"] is None
    known = {pair_key(item) for item in api.state.tenants["tenant-1"].items}
    assert {pair_key(item) for item in body["data"]} <= known
    assert any("uniqueJobUid" not in item for item in api.state.tenants["tenant-1"].items)
    assert all(None not in item.values() for item in body["data"])


async def test_each_tenant_sees_its_own_data(api: Api) -> None:
    for name, tenant in api.state.tenants.items():
        items = await api.all_sorted(name, limit=500)
        assert sorted(map(pair_key, items), key=str) == sorted(map(pair_key, tenant.items), key=str)


@pytest.mark.parametrize("authorization", [None, "Bearer nope", "Basic abc", "Bearer "])
async def test_bad_credentials_are_401(
    http: aiohttp.ClientSession, simulator: str, authorization: str | None
) -> None:
    headers = headers_for()
    if authorization is not None:
        headers["Authorization"] = authorization
    async with http.get(simulator + JOB_OBJECTS, headers=headers) as response:
        assert response.status == 401
        body = await response.json()
    assert body["errors"][0]["type"] == "security"
    assert body["errors"][0]["code"] == 401


async def test_password_grant_and_refresh_rotation(api: Api) -> None:
    tenant = api.state.tenants["tenant-2"]
    status, grant = await api.token(
        {"grant_type": "password", "username": tenant.username, "password": tenant.password}
    )
    assert status == 200
    assert grant["token_type"] == "bearer"
    assert grant["expires_in"] == 3600
    first_access, first_refresh = grant["access_token"], grant["refresh_token"]

    async def total_with(access: str) -> tuple[int, int | None]:
        async with api.http.get(api.url + JOB_OBJECTS, headers=headers_for(access)) as response:
            body = await response.json()
            return response.status, (body.get("meta") or {}).get("pagingInfo", {}).get("total")

    assert await total_with(first_access) == (200, 300)
    assert api.state.request_log[-1].tenant == "tenant-2"
    assert api.state.request_log[-1].credential == "access_token"

    status, rotated = await api.token(
        {"grant_type": "refresh_token", "refresh_token": first_refresh}
    )
    assert status == 200
    assert rotated["refresh_token"] != first_refresh
    assert rotated["access_token"] != first_access
    status, reused = await api.token(
        {"grant_type": "refresh_token", "refresh_token": first_refresh}
    )
    assert (status, reused["error"]) == (400, "invalid_grant")
    assert (await total_with(first_access))[0] == 200  # the old access token lives on
    assert (await total_with(rotated["access_token"]))[0] == 200
    assert api.state.token_grants == {"password": 1, "refresh_token": 1}

    api.state.revoke_tokens("tenant-2")
    assert (await total_with(rotated["access_token"]))[0] == 401
    status, after = await api.token(
        {"grant_type": "refresh_token", "refresh_token": rotated["refresh_token"]}
    )
    assert (status, after["error"]) == (400, "invalid_grant")
    status, _, _ = await api.get(tenant="tenant-2")
    assert status == 200  # API keys are not tokens


@pytest.mark.parametrize(
    ("form", "error"),
    [
        (
            {"grant_type": "password", "username": "tenant-1-user", "password": "wrong"},
            "invalid_grant",
        ),
        ({"grant_type": "password", "username": "nobody", "password": "x"}, "invalid_grant"),
        ({"grant_type": "password", "username": "tenant-1-user"}, "invalid_request"),
        ({"grant_type": "refresh_token"}, "invalid_request"),
        ({"grant_type": "refresh_token", "refresh_token": "made-up"}, "invalid_grant"),
        ({"username": "tenant-1-user"}, "invalid_request"),
        ({"grant_type": "client_credentials"}, "unsupported_grant_type"),
    ],
)
async def test_token_errors(api: Api, form: dict[str, str], error: str) -> None:
    status, body = await api.token(form)
    assert status == 400
    assert body["error"] == error
    assert body["error_description"]
    assert not api.state.token_grants


async def test_mfa_account_refuses_password_grant(api: Api) -> None:
    tenant = api.state.tenants["tenant-3"]
    tenant.mfa = True
    status, body = await api.token(
        {"grant_type": "password", "username": tenant.username, "password": tenant.password}
    )
    assert (status, body["error"]) == (400, "invalid_grant")
    assert "multi-factor authentication" in body["error_description"].lower()


async def test_access_tokens_expire(http: aiohttp.ClientSession) -> None:
    state = sim.SimulatorState(
        sim.make_dataset(tenants=1, pairs_per_tenant=10), token_lifetime_s=0.3
    )
    async with sim.run_simulator(state) as url:
        api = Api(http, url, state)
        tenant = state.tenants["tenant-1"]
        _, grant = await api.token(
            {"grant_type": "password", "username": tenant.username, "password": tenant.password}
        )
        assert grant["expires_in"] == 1
        headers = headers_for(grant["access_token"])
        async with http.get(url + JOB_OBJECTS, headers=headers) as response:
            assert response.status == 200
        await asyncio.sleep(0.35)
        async with http.get(url + JOB_OBJECTS, headers=headers) as response:
            assert response.status == 401


@pytest.mark.parametrize("version", [None, "3.4", ""])
async def test_client_version_is_required(api: Api, version: str | None) -> None:
    async with api.http.get(api.url + JOB_OBJECTS, headers=headers_for(api.key(), version)) as r:
        assert r.status == 400
        body = await r.json()
    assert body["error"]["code"] == "UnsupportedApiVersion"
    assert body["error"]["message"]
    status, token_body = await api.token({"grant_type": "password"}, version=version)
    assert (status, token_body["error"]["code"]) == (400, "UnsupportedApiVersion")


async def test_older_supported_version_and_optional_check(
    api: Api, http: aiohttp.ClientSession
) -> None:
    async with http.get(api.url + JOB_OBJECTS, headers=headers_for(api.key(), "3.5")) as response:
        assert response.status == 200
    api.state.require_client_version = False
    async with http.get(api.url + JOB_OBJECTS, headers=headers_for(api.key(), None)) as response:
        assert response.status == 200


async def test_request_log_records_headers_without_secrets(api: Api) -> None:
    request_id = str(uuid.uuid4())
    async with api.http.get(
        api.url + JOB_OBJECTS,
        params={"limit": "5"},
        headers={**headers_for(api.key()), "X-Request-id": request_id, "User-Agent": "t/1"},
    ) as response:
        assert response.status == 200
    record = api.state.request_log[-1]
    assert (record.method, record.path, record.query) == ("GET", JOB_OBJECTS, {"limit": "5"})
    assert (record.tenant, record.status, record.credential) == ("tenant-1", 200, "api_key")
    assert record.headers["x-request-id"] == request_id
    assert record.headers["User-Agent"] == "t/1"
    assert record.headers["Authorization"] == "Bearer [redacted]"
    assert api.key() not in repr(list(api.state.request_log))
    assert api.state.requests_by_status[200] == 1


async def test_unknown_path_and_read_only_key(api: Api) -> None:
    status, body, _ = await api.get("/api/v3/nothing/here")
    assert (status, body["errors"][0]["code"]) == (404, 404)
    api.state.tenants["tenant-1"].read_only_key = True
    async with api.http.post(api.url + JOB_OBJECTS, headers=headers_for(api.key())) as response:
        assert response.status == 403
        assert (await response.json())["errors"][0]["type"] == "security"


# --- paging ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 501},
        {"limit": "ten"},
        {"limit": 1.5},
        {"offset": -1},
        {"offset": 2_147_483_648},
        {"sort": '[{"property": "name", "direction": "ascending"}]'},
        {"sort": '[{"property": "jobUid", "direction": "upwards"}]'},
        {"sort": "not json"},
        {"filter": '[{"property": "jobUid", "operation": "matches", "value": "x"}]'},
        {"select": '[{"propertyPath": "secret"}]'},
    ],
)
async def test_invalid_parameters_are_400(api: Api, params: dict[str, Any]) -> None:
    status, body, _ = await api.get(**params)
    assert status == 400
    assert body["errors"][0]["type"] == "logical"
    assert body["errors"][0]["message"]


async def test_limit_bounds_and_offset_past_the_end(api: Api) -> None:
    status, body, _ = await api.get(limit=500, sort=FULL_SORT)
    assert (status, body["meta"]["pagingInfo"]["count"]) == (200, 300)
    status, body, _ = await api.get(limit=1, offset=299, sort=FULL_SORT)
    assert body["meta"]["pagingInfo"] == {"total": 300, "count": 1, "offset": 299}
    status, body, _ = await api.get(offset=2_147_483_647)
    assert status == 200
    assert body["data"] == []
    assert body["meta"]["pagingInfo"] == {"total": 300, "count": 0, "offset": 2_147_483_647}


async def test_sorted_paging_returns_every_item_once_in_order(api: Api) -> None:
    items = await api.all_sorted(limit=70)
    keys = [pair_key(item) for item in items]
    assert len(keys) == len(set(keys)) == 300
    assert set(keys) == {pair_key(item) for item in api.state.tenants["tenant-1"].items}
    assert keys == sorted(keys, key=lambda key: (key[0], key[1], key[2] or ""))
    again = await api.all_sorted(limit=70)
    assert again == items


async def test_sort_descending_and_missing_unique_uid_first(api: Api) -> None:
    by_unique = '[{"property": "uniqueJobUid", "direction": "ascending"}]'
    _, body, _ = await api.get(limit=500, sort=by_unique)
    uniques = [item.get("uniqueJobUid") for item in body["data"]]
    missing = uniques.count(None)
    assert missing > 0
    assert uniques[:missing] == [None] * missing
    assert uniques[missing:] == sorted(uniques[missing:])
    descending = '[{"property": "linkedJobUid", "direction": "descending"}]'
    _, body, _ = await api.get(limit=500, sort=descending)
    linked = [item["linkedJobUid"] for item in body["data"]]
    assert linked == sorted(linked, reverse=True)


async def test_unsorted_order_is_unstable(api: Api) -> None:
    _, first, _ = await api.get(limit=100)
    _, second, _ = await api.get(limit=100)
    assert first["data"] != second["data"]
    seen: list[tuple[str, str, str | None]] = []
    for offset in (0, 100, 200):
        _, body, _ = await api.get(limit=100, offset=offset)
        seen.extend(pair_key(item) for item in body["data"])
    assert len(seen) == 300
    assert len(set(seen)) < 300  # a client that does not sort sees duplicates and misses


async def test_filter_and_select(api: Api) -> None:
    job_uid = api.state.tenants["tenant-1"].items[0]["jobUid"]
    expected = [i for i in api.state.tenants["tenant-1"].items if i["jobUid"] == job_uid]
    query = orjson.dumps([{"property": "jobUid", "operation": "equals", "value": job_uid}])
    _, body, _ = await api.get(filter=query.decode(), sort=FULL_SORT)
    assert body["meta"]["pagingInfo"]["total"] == len(expected)
    assert {pair_key(i) for i in body["data"]} == {pair_key(i) for i in expected}
    _, body, _ = await api.get(select='[{"propertyPath": "linkedJobUid"}]', sort=FULL_SORT)
    assert all(list(item) == ["linkedJobUid"] for item in body["data"])


async def test_changes_invalidate_cached_pages(api: Api) -> None:
    before = await api.all_sorted(limit=500)
    removed = api.state.remove_pairs("tenant-1", 10)
    added = api.state.add_pairs("tenant-1", 25)
    assert (len(removed), len(added)) == (10, 25)
    after = await api.all_sorted(limit=500)
    assert len(after) == 315
    assert {pair_key(i) for i in after} == (
        {pair_key(i) for i in before} - {pair_key(i) for i in removed}
    ) | {pair_key(i) for i in added}
    assert api.state.churn("tenant-1", 0.2) == (63, 63)
    churned = await api.all_sorted(limit=500)
    assert len(churned) == 315
    assert len({pair_key(i) for i in churned} & {pair_key(i) for i in after}) == 315 - 63


async def test_concurrency_is_observed_per_tenant(api: Api) -> None:
    api.state.inject(sim.Fault("latency", tenant="tenant-2", delay_s=0.15, times=None))
    results = await asyncio.gather(*(api.get(tenant="tenant-2") for _ in range(5)))
    assert [status for status, _, _ in results] == [200] * 5
    assert api.state.max_in_flight["tenant-2"] == 5
    assert api.state.in_flight["tenant-2"] == 0
    assert api.state.max_in_flight["tenant-1"] == 0


# --- faults ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "error_type"),
    [
        (sim.Fault("520"), 520, "transport"),
        (sim.Fault("520", error_type="retryableLogical"), 520, "retryableLogical"),
        (sim.Fault("status", status=409), 409, "logical"),
        (sim.Fault("status", status=500), 520, "logical"),
        (sim.Fault("403"), 403, "security"),
        (sim.Fault("401"), 401, "security"),
        (sim.Fault("429"), 429, "transport"),
    ],
)
async def test_error_faults_fire_once(
    api: Api, fault: sim.Fault, status: int, error_type: str
) -> None:
    api.state.inject(fault)
    got, body, _ = await api.get()
    assert got == status
    assert body["errors"][0]["type"] == error_type
    assert "retryAfter" not in body["errors"][0]
    assert (await api.get())[0] == 200
    assert api.state.faults_fired[fault.kind] == 1


@pytest.mark.parametrize(
    ("where", "in_body", "in_header"),
    [("body", 2, None), ("header", None, "2"), ("both", 2, "2")],
)
async def test_429_retry_after(
    api: Api, where: str, in_body: int | None, in_header: str | None
) -> None:
    api.state.inject(sim.Fault("429", retry_after_s=2, retry_after_in=where))
    status, body, response = await api.get()
    assert status == 429
    assert body["errors"][0]["code"] == 429
    assert body["errors"][0].get("retryAfter") == in_body
    assert response.headers.get("Retry-After") == in_header


async def test_fault_matching_by_tenant_offset_times_probability(api: Api) -> None:
    api.state.inject(sim.Fault("520", tenant="tenant-2", offset=100, times=2))
    assert (await api.get(offset=100))[0] == 200  # other tenant
    assert (await api.get(tenant="tenant-2", offset=0))[0] == 200  # other offset
    assert (await api.get(tenant="tenant-2", offset=100))[0] == 520
    assert (await api.get(tenant="tenant-2", offset=100))[0] == 520
    assert (await api.get(tenant="tenant-2", offset=100))[0] == 200  # used up

    api.state.inject(sim.Fault("520", probability=0.5, times=None))
    statuses = collections.Counter([(await api.get(limit=1))[0] for _ in range(40)])
    assert 5 < statuses[520] < 35 and statuses[520] + statuses[200] == 40
    api.state.clear_faults()
    assert (await api.get())[0] == 200


async def test_latency_fault(api: Api) -> None:
    api.state.inject(sim.Fault("latency", delay_s=0.2))
    started = time.monotonic()
    status, _, _ = await api.get()
    assert status == 200
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    await api.get()
    assert time.monotonic() - started < 0.2


async def test_hang_fault_until_client_gives_up(api: Api) -> None:
    api.state.inject(sim.Fault("hang"))
    with pytest.raises(asyncio.TimeoutError):
        async with api.http.get(
            api.url + JOB_OBJECTS,
            headers=headers_for(api.key()),
            timeout=aiohttp.ClientTimeout(total=0.3),
        ):
            pass
    hung = api.state.request_log[-1]
    assert (await api.get())[0] == 200
    for _ in range(50):
        if api.state.in_flight["tenant-1"] == 0:
            break
        await asyncio.sleep(0.01)
    assert api.state.in_flight["tenant-1"] == 0  # the handler was cancelled, not left asleep
    assert hung.status == 0


async def test_hang_does_not_block_shutdown(http: aiohttp.ClientSession) -> None:
    state = sim.SimulatorState(sim.make_dataset(tenants=1, pairs_per_tenant=5))
    state.inject(sim.Fault("hang"))
    started = time.monotonic()
    async with sim.run_simulator(state) as url:
        request = asyncio.ensure_future(
            http.get(url + JOB_OBJECTS, headers=headers_for(state.tenants["tenant-1"].api_key))
        )
        await asyncio.sleep(0.1)
    assert time.monotonic() - started < 5
    try:
        response = await request
    except aiohttp.ClientError:
        return  # the connection was closed under it: also fine
    assert response.status == 520
    response.release()


async def test_malformed_json_fault(api: Api) -> None:
    api.state.inject(sim.Fault("malformed_json"))
    status, body, _ = await api.get()
    assert status == 200
    assert isinstance(body, bytes)  # not JSON
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)


async def test_truncated_fault(api: Api) -> None:
    _, full, _ = await api.get(sort=FULL_SORT)
    api.state.inject(sim.Fault("truncated"))
    async with api.http.get(
        api.url + JOB_OBJECTS, params={"sort": FULL_SORT}, headers=headers_for(api.key())
    ) as response:
        raw = await response.read()
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == len(raw)
    whole = orjson.dumps(full)
    assert raw == whole[: len(whole) // 2]


@pytest.mark.parametrize(
    "kind",
    ["bad_uuid", "missing_field", "wrong_total", "wrong_count", "null_meta", "wrong_offset"],
)
async def test_payload_faults(api: Api, kind: str) -> None:
    _, good, _ = await api.get(offset=100, sort=FULL_SORT)
    _, first_page, _ = await api.get(offset=0, sort=FULL_SORT)
    api.state.inject(sim.Fault(kind, offset=100))
    status, bad, _ = await api.get(offset=100, sort=FULL_SORT)
    assert status == 200
    assert bad != good
    if kind == "bad_uuid":
        assert sum(item["jobUid"] == "not-a-uuid" for item in bad["data"]) == 1
    elif kind == "missing_field":
        assert sum("linkedJobUid" not in item for item in bad["data"]) == 1
    elif kind == "wrong_total":
        assert bad["meta"]["pagingInfo"]["total"] == 307
    elif kind == "wrong_count":
        assert bad["meta"]["pagingInfo"]["count"] != len(bad["data"])
    elif kind == "null_meta":
        assert bad["meta"] is None and bad["data"] == good["data"]
    else:
        assert bad == first_page
    assert (await api.get(offset=100, sort=FULL_SORT))[1] == good  # the cache was not damaged


async def test_drift_fault_changes_data_after_the_page(api: Api) -> None:
    before = {pair_key(i) for i in api.state.tenants["tenant-1"].items}
    api.state.inject(sim.Fault("drift"))
    status, page, _ = await api.get(sort=FULL_SORT)
    assert status == 200
    assert page["meta"]["pagingInfo"]["total"] == 300
    after = {pair_key(i) for i in api.state.tenants["tenant-1"].items}
    assert len(before - after) == 1 and len(after - before) == 1
    assert len(await api.all_sorted()) == 300
    assert {pair_key(i) for i in await api.all_sorted()} == after


async def test_async_202_flow(api: Api) -> None:
    _, expected, _ = await api.get(offset=100, sort=FULL_SORT)
    api.state.inject(sim.Fault("async202", polls=2))
    status, _, response = await api.get(offset=100, sort=FULL_SORT)
    assert status == 202
    location = response.headers["Location"]
    assert location.startswith("/api/v3/asyncActions/")
    action_id = location.rsplit("/", 1)[1]
    for _ in range(2):
        status, body, response = await api.get(location)
        assert status == 202
        assert body["data"] == {"id": action_id, "status": "running"}
        assert response.headers["Location"] == location
    status, body, _ = await api.get(location)
    assert (status, body) == (200, expected)
    assert (await api.get(location, tenant="tenant-2"))[0] == 404  # another tenant's action
    assert (await api.get(f"/api/v3/asyncActions/{uuid.uuid4()}"))[0] == 404


async def test_token_endpoint_faults(api: Api) -> None:
    tenant = api.state.tenants["tenant-1"]
    form = {"grant_type": "password", "username": tenant.username, "password": tenant.password}
    api.state.inject(sim.Fault("wrong_total"))  # page faults do not touch the token endpoint
    api.state.inject(sim.Fault("520", tenant="tenant-1"))
    api.state.inject(sim.Fault("429", retry_after_s=1))
    status, body = await api.token(form)
    assert (status, body["errors"][0]["type"]) == (520, "transport")
    status, body = await api.token(form)
    assert (status, body["errors"][0]["retryAfter"]) == (429, 1)
    status, body = await api.token(form)
    assert status == 200 and body["access_token"]
    assert api.state.requests_by_status == {520: 1, 429: 1, 200: 1}


# --- serving ---------------------------------------------------------------------------------


async def test_tls(http: aiohttp.ClientSession) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    state = sim.SimulatorState(sim.make_dataset(tenants=1, pairs_per_tenant=3))
    async with sim.run_simulator(state, ssl_context=server_context) as url:
        assert url.startswith("https://127.0.0.1:")
        async with http.get(
            url + JOB_OBJECTS,
            headers=headers_for(state.tenants["tenant-1"].api_key),
            ssl=client_context,
        ) as response:
            assert response.status == 200


async def test_serve_prints_a_usable_config(http: aiohttp.ClientSession) -> None:
    lines: list[str] = []
    task = asyncio.create_task(
        sim.serve(port=0, tenants=2, pairs=50, seed=5, print_fn=lines.append)
    )
    for _ in range(200):
        if len(lines) >= 4:
            break
        await asyncio.sleep(0.01)
    text = "\n".join(lines)
    dataset = sim.make_dataset(tenants=2, pairs_per_tenant=50, seed=5)
    url = text.split(" at ", 1)[1].split("\n", 1)[0]
    assert url.startswith("http://127.0.0.1:")
    for tenant in dataset:
        assert f'name = "{tenant.name}"' in text
        assert f'api_key = "{tenant.api_key}"' in text
    assert f'url = "{url}"' in text
    async with http.get(url + JOB_OBJECTS, headers=headers_for(dataset[1].api_key)) as response:
        assert (await response.json())["meta"]["pagingInfo"]["total"] == 50
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- the other collections ---------------------------------------------------------------

CATALOG_SORT = orjson.dumps([{"property": "instanceUid", "direction": "ascending"}]).decode()


def test_catalog_agrees_with_the_links() -> None:
    (tenant,) = sim.make_dataset(
        tenants=1, pairs_per_tenant=2000, seed=4, immediate_pairs_per_tenant=300
    )
    jobs = {job["instanceUid"]: job for job in tenant.jobs}
    assert len(jobs) == len(tenant.jobs)  # one item per job
    copy_types = {jobs[i["jobUid"]]["type"] for i in tenant.items}
    assert copy_types == {"BackupCopy"}
    assert {jobs[i["jobUid"]]["type"] for i in tenant.immediate_items} == {"SimpleBackupCopy"}
    sources = {i["linkedJobUid"] for i in tenant.items + tenant.immediate_items}
    deleted = sources - set(jobs)
    assert 0 < len(deleted) <= 0.02 * len(sources)  # a few linked jobs are gone from VBR
    uncopied = [
        job
        for uid, job in jobs.items()
        if uid not in sources and job["type"] in ("BackupVm", "AgentBackupJob", "AgentPolicy")
    ]
    assert len(uncopied) > 0.05 * len(sources)  # backup jobs nothing copies
    servers = {server["instanceUid"] for server in tenant.backup_servers}
    organizations = {org["instanceUid"] for org in tenant.organizations}
    assert {job["backupServerUid"] for job in jobs.values()} <= servers
    assert {job.get("mappedOrganizationUid") for job in jobs.values()} - {None} <= organizations
    assert {server["organizationUid"] for server in tenant.backup_servers} <= organizations
    # Without a catalog, or asked for no immediate pairs, the links are the same.
    (bare,) = sim.make_dataset(tenants=1, pairs_per_tenant=2000, seed=4, catalog=False)
    assert bare.items == tenant.items and bare.jobs == [] and bare.immediate_items == []


async def test_every_collection_pages_and_can_be_unavailable(api: Api) -> None:
    tenant = api.state.tenants["tenant-1"]
    for name, path in sim.COLLECTION_PATHS.items():
        sort = FULL_SORT if name in sim.LINK_COLLECTIONS else CATALOG_SORT
        status, body, _ = await api.get(path, limit=500, sort=sort)
        assert status == 200, name
        assert body["meta"]["pagingInfo"]["total"] == len(tenant.collection(name))
    api.state.unavailable_collections.add("organizations")
    status, body, _ = await api.get(sim.ORGANIZATIONS_PATH, sort=CATALOG_SORT)
    assert (status, body["errors"][0]["code"]) == (404, 404)
    assert (await api.get(sim.JOBS_PATH, sort=CATALOG_SORT))[0] == 200


async def test_a_fault_can_target_one_collection(api: Api) -> None:
    api.state.inject(sim.Fault("520", collection="jobs", times=None))
    assert (await api.get(sim.JOBS_PATH, sort=CATALOG_SORT))[0] == 520
    assert (await api.get(sim.BACKUP_SERVERS_PATH, sort=CATALOG_SORT))[0] == 200
    assert (await api.get(sort=FULL_SORT))[0] == 200
    with pytest.raises(ValueError, match="unknown collection"):
        sim.Fault("520", collection="job")


async def test_payload_faults_damage_catalog_identities(api: Api) -> None:
    api.state.inject(sim.Fault("bad_uuid", collection="jobs"))
    _, body, _ = await api.get(sim.JOBS_PATH, sort=CATALOG_SORT, limit=10)
    assert sum(item["instanceUid"] == "not-a-uuid" for item in body["data"]) == 1
    api.state.inject(sim.Fault("missing_field", collection="organizations"))
    _, body, _ = await api.get(sim.ORGANIZATIONS_PATH, sort=CATALOG_SORT)
    assert sum("instanceUid" not in item for item in body["data"]) == 1


async def test_rename_and_drift_of_a_catalog(api: Api) -> None:
    uid = api.state.tenants["tenant-1"].jobs[0]["instanceUid"]
    _, before, _ = await api.get(sim.JOBS_PATH, sort=CATALOG_SORT, limit=500)
    api.state.rename_job("tenant-1", uid, "Renamed")
    _, after, _ = await api.get(sim.JOBS_PATH, sort=CATALOG_SORT, limit=500)
    assert [job["name"] for job in after["data"] if job["instanceUid"] == uid] == ["Renamed"]
    assert len(after["data"]) == len(before["data"])
    uids = {job["instanceUid"] for job in after["data"]}
    api.state.inject(sim.Fault("drift", collection="jobs"))
    await api.get(sim.JOBS_PATH, sort=CATALOG_SORT, limit=10)
    _, drifted, _ = await api.get(sim.JOBS_PATH, sort=CATALOG_SORT, limit=500)
    moved = {job["instanceUid"] for job in drifted["data"]}
    assert len(moved) == len(uids) and len(moved - uids) == 1
