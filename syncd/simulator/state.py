"""The simulated VSPC: its tenants' data, credentials and tokens, armed faults, cached pages,
async actions, and what tests observe. No HTTP here: `app` answers requests by calling
`SimulatorState`'s public methods.

It serves five collections per tenant (`dataset.COLLECTIONS`: the links of both copy modes
and the catalog); `unavailable_collections` makes some answer 404, as an older VSPC does.
Sorted page bodies are cached per tenant and dropped on any change to that tenant's data, so
a million pairs page quickly. Without `sort` the order is deliberately unstable (a fresh
random order per request), as the API only promises "the default order based on its own
semantics": a client that forgets to sort gets duplicates and misses, and the tests notice.
"""

from __future__ import annotations

import collections
import contextlib
import math
import random
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict

from syncd.simulator import dataset, faults, queries

REQUEST_LOG_SIZE = 10_000
_PAGE_CACHE_ENTRIES = 50_000
_ASYNC_ACTIONS_KEPT = 10_000
_ISSUED_TOKENS_KEPT = 10_000


@dataclass
class RequestRecord:
    """One request as the simulator saw it. `status` stays 0 until it is answered (or forever,
    when the client gave up first). The Authorization value is redacted; `credential` says
    which kind authenticated the request: "api_key", "access_token" or None. `peer` is the
    client's "host:port", one per connection."""

    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    tenant: str | None = None
    status: int = 0
    credential: str | None = None
    started_at: float = 0.0
    duration_s: float = 0.0
    peer: str | None = None  # the client's address and port: one per connection


@dataclass
class _ArmedFault:
    fault: faults.Fault
    remaining: int | None


@dataclass
class _Token:
    tenant: str
    expires_at: float


@dataclass(frozen=True)
class TokenPair:
    """What a successful grant hands out."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in_s: int


@dataclass
class AsyncAction:
    """A queued request's answer, ready once `polls_left` more polls have been answered."""

    tenant: str
    body: bytes = field(repr=False)
    polls_left: int

    def poll(self) -> bytes | None:
        """The answer, or None (and one poll fewer to go) while it is still running."""
        if self.polls_left > 0:
            self.polls_left -= 1
            return None
        return self.body


class SimulatorState:
    """The simulated VSPC's data, issued tokens, injected faults and observations.

    Observations for tests: `requests_by_status`, `max_in_flight` / `in_flight` (collection
    requests per tenant, all collections together), `request_log` (the last 10,000
    requests), `token_grants` (successful grants by type), `faults_fired` (by kind) and
    `issued_tokens` (the last 10,000 access and refresh tokens handed out;
    `reset_observations` keeps them, so that a test looking for leaked tokens sees every
    one).

    The request handler (`app.create_app`) reads and changes the state only through its public
    methods: `authenticate`, the token methods, `take_fault`, `page_body` / `page_document`,
    `serving_page` and the async action methods.
    """

    def __init__(
        self,
        tenants: list[dataset.SimTenant],
        *,
        seed: int = 0,
        token_lifetime_s: float = 3600.0,
        require_client_version: bool = True,
        supported_versions: tuple[str, ...] = ("3.6", "3.5"),
        max_page_size: int = 500,
    ) -> None:
        self.tenants: dict[str, dataset.SimTenant] = {}
        self._by_api_key: dict[str, str] = {}
        self._by_username: dict[str, str] = {}
        for tenant in tenants:
            if tenant.name in self.tenants:
                raise ValueError(f"duplicate tenant name {tenant.name!r}")
            if tenant.api_key in self._by_api_key or tenant.username in self._by_username:
                raise ValueError(f"tenant {tenant.name!r} reuses another tenant's credentials")
            self.tenants[tenant.name] = tenant
            self._by_api_key[tenant.api_key] = tenant.name
            self._by_username[tenant.username] = tenant.name
        self.token_lifetime_s = token_lifetime_s
        self.require_client_version = require_client_version
        self.supported_versions = supported_versions
        self.max_page_size = max_page_size
        self.hang_s = 3600.0
        # Collections (by name) answered with 404, as by an older VSPC that lacks them.
        self.unavailable_collections: set[str] = set()

        self.requests_by_status: collections.Counter[int] = collections.Counter()
        self.in_flight: dict[str, int] = dict.fromkeys(self.tenants, 0)
        self.max_in_flight: dict[str, int] = dict.fromkeys(self.tenants, 0)
        self.request_log: collections.deque[RequestRecord] = collections.deque(
            maxlen=REQUEST_LOG_SIZE
        )
        self.token_grants: collections.Counter[str] = collections.Counter()
        self.issued_tokens: collections.deque[str] = collections.deque(maxlen=_ISSUED_TOKENS_KEPT)
        self.faults_fired: collections.Counter[str] = collections.Counter()

        # Separate streams so that, e.g., unsorted requests do not shift which faults fire.
        self._fault_rng = random.Random(f"{seed}:faults")  # noqa: S311 - simulation only
        self._order_rng = random.Random(f"{seed}:order")  # noqa: S311 - simulation only
        self._data_rng = random.Random(f"{seed}:data")  # noqa: S311 - simulation only
        self._faults: list[_ArmedFault] = []
        self._access_tokens: dict[str, _Token] = {}
        self._refresh_tokens: dict[str, str] = {}
        self._views: dict[str, dict[tuple[Any, ...], list[dict[str, str]]]] = {}
        self._pages: dict[str, dict[tuple[Any, ...], bytes]] = {}
        self._async_actions: collections.OrderedDict[str, AsyncAction] = collections.OrderedDict()

    # --- scripting -------------------------------------------------------------------------

    def inject(self, fault: faults.Fault) -> None:
        """Arms `fault`; faults are checked in the order they were injected."""
        if fault.tenant is not None and fault.tenant not in self.tenants:
            raise ValueError(f"unknown tenant {fault.tenant!r}")
        self._faults.append(_ArmedFault(fault, fault.times))

    def clear_faults(self) -> None:
        """Disarms every fault."""
        self._faults.clear()

    def revoke_tokens(self, tenant: str | None = None) -> None:
        """Invalidates every issued access and refresh token (of `tenant`, or of everyone).
        API keys stay valid."""
        self._access_tokens = {
            token: issued
            for token, issued in self._access_tokens.items()
            if tenant is not None and issued.tenant != tenant
        }
        self._refresh_tokens = {
            token: owner
            for token, owner in self._refresh_tokens.items()
            if tenant is not None and owner != tenant
        }

    def invalidate(self, tenant: str | None = None) -> None:
        """Drops cached views and pages (after editing `SimTenant.items` directly)."""
        if tenant is None:
            self._views.clear()
            self._pages.clear()
        else:
            self._views.pop(tenant, None)
            self._pages.pop(tenant, None)

    def reset_observations(self) -> None:
        """Clears counters and the request log (not data, tokens or faults)."""
        self.requests_by_status.clear()
        self.request_log.clear()
        self.token_grants.clear()
        self.faults_fired.clear()
        self.max_in_flight = dict(self.in_flight)

    # --- churn -----------------------------------------------------------------------------

    def add_pairs(
        self, tenant: str, n: int, collection: str = "backup_copy_job_objects"
    ) -> list[dict[str, str]]:
        """Adds `n` new pairs to `tenant`'s links `collection`: new copy jobs, or new
        sources of existing ones. Their new jobs join the catalog if it follows the links."""
        sim_tenant = self.tenants[tenant]
        items: list[dict[str, str]] = sim_tenant.collection(collection)
        existing = {(i["jobUid"], i["linkedJobUid"], i.get("uniqueJobUid")) for i in items}
        added: list[dict[str, str]] = []
        sources: list[str] = []
        rng = self._data_rng
        while len(added) < n:
            if items and rng.random() < 0.3:
                template = rng.choice(items)
                item = {"jobUid": template["jobUid"], "linkedJobUid": dataset.random_uuid4(rng)}
                if "uniqueJobUid" in template:
                    item["uniqueJobUid"] = template["uniqueJobUid"]
                candidates = [item]
            else:
                candidates = dataset.copy_job_items(rng, sources, 0.9, rng.randint(1, 3))
            for item in candidates[: n - len(added)]:
                key = (item["jobUid"], item["linkedJobUid"], item.get("uniqueJobUid"))
                if key not in existing:
                    existing.add(key)
                    added.append(item)
        items.extend(added)
        if sim_tenant.catalog_follows_links:
            immediate = collection == "immediate_copy_job_objects"
            copy_type = "SimpleBackupCopy" if immediate else "BackupCopy"
            dataset.add_jobs_for(sim_tenant, added, copy_type, rng)
        self.invalidate(tenant)
        return added

    def remove_pairs(
        self, tenant: str, n: int, collection: str = "backup_copy_job_objects"
    ) -> list[dict[str, str]]:
        """Removes `n` random pairs (or all, if fewer) from `tenant`'s links `collection`;
        returns them. The catalog keeps their jobs."""
        items: list[dict[str, str]] = self.tenants[tenant].collection(collection)
        doomed = set(self._data_rng.sample(range(len(items)), min(n, len(items))))
        removed = [item for index, item in enumerate(items) if index in doomed]
        items[:] = [item for index, item in enumerate(items) if index not in doomed]
        self.invalidate(tenant)
        return removed

    def drift(self, tenant: str, collection: str) -> None:
        """One item of `collection` goes, another comes (data changing while it is paged)."""
        if collection in dataset.LINK_COLLECTIONS:
            self.remove_pairs(tenant, 1, collection)
            self.add_pairs(tenant, 1, collection)
            return
        items: list[dict[str, Any]] = self.tenants[tenant].collection(collection)
        if items:
            template = items.pop(self._data_rng.randrange(len(items)))
            items.append({**template, "instanceUid": dataset.random_uuid4(self._data_rng)})
        self.invalidate(tenant)

    def job(self, tenant: str, uid: str) -> dict[str, Any]:
        """`tenant`'s job `uid` (its `instanceUid`); KeyError if the catalog lacks it."""
        for job in self.tenants[tenant].jobs:
            if job["instanceUid"] == uid:
                return job
        raise KeyError(uid)

    def set_job_fields(self, tenant: str, uid: str, **fields: Any) -> None:
        """Changes fields of job `uid` as VSPC would report them (None removes a field)."""
        jobs = self.tenants[tenant].jobs
        old = self.job(tenant, uid)
        new = {**old, **fields}
        for key, value in fields.items():
            if value is None:
                del new[key]
        # Replaced, not edited: cached views and pages hold the old dict.
        jobs[jobs.index(old)] = new
        self.invalidate(tenant)

    def rename_job(self, tenant: str, uid: str, name: str) -> None:
        """Renames job `uid` of `tenant`."""
        self.set_job_fields(tenant, uid, name=name)

    def churn(self, tenant: str, fraction: float) -> tuple[int, int]:
        """Removes, then adds, `fraction` of `tenant`'s pairs; returns (removed, added)."""
        count = round(len(self.tenants[tenant].items) * fraction)
        removed = self.remove_pairs(tenant, count)
        added = self.add_pairs(tenant, count)
        return len(removed), len(added)

    # --- auth ------------------------------------------------------------------------------

    def authenticate(self, header: str | None) -> tuple[str, str] | None:
        """(tenant, credential kind) for an Authorization header value, if it is valid; the
        kind is "api_key" or "access_token"."""
        scheme, _, credential = (header or "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return None
        tenant = self._by_api_key.get(credential)
        if tenant is not None:
            return tenant, "api_key"
        token = self._access_tokens.get(credential)
        if token is None:
            return None
        if token.expires_at <= time.monotonic():
            del self._access_tokens[credential]
            return None
        return token.tenant, "access_token"

    def tenant_by_username(self, username: str) -> str | None:
        """The tenant whose account is `username`, if there is one."""
        return self._by_username.get(username)

    def refresh_token_owner(self, refresh_token: str) -> str | None:
        """The tenant a valid refresh token belongs to, without spending the token."""
        return self._refresh_tokens.get(refresh_token)

    def redeem_refresh_token(self, refresh_token: str) -> str | None:
        """Spends a refresh token (they rotate); its tenant, or None if it is not valid."""
        return self._refresh_tokens.pop(refresh_token, None)

    def issue_tokens(self, tenant: str, grant: str) -> TokenPair:
        """A new access and refresh token for `tenant`, counted in `token_grants[grant]`."""
        access = f"sim-at-{secrets.token_urlsafe(24)}"
        refresh = f"sim-rt-{secrets.token_urlsafe(24)}"
        self._access_tokens[access] = _Token(tenant, time.monotonic() + self.token_lifetime_s)
        self._refresh_tokens[refresh] = tenant
        self.token_grants[grant] += 1
        self.issued_tokens.extend((access, refresh))
        # Rounded up so a short test lifetime is never advertised as 0.
        return TokenPair(access, refresh, math.ceil(self.token_lifetime_s))

    # --- faults ----------------------------------------------------------------------------

    def take_fault(
        self,
        tenant: str | None,
        offset: int | None,
        kinds: frozenset[faults.FaultKind],
        collection: str | None = None,
    ) -> tuple[float, faults.Fault | None]:
        """For a request of `tenant` at `offset` of `collection` (None, None: the token
        endpoint), among faults of `kinds`: (total latency to add, the one other fault to
        apply), consuming what fires."""
        delay_s = 0.0
        chosen: faults.Fault | None = None
        for armed in self._faults:
            fault = armed.fault
            if armed.remaining == 0 or fault.kind not in kinds:
                continue
            if fault.tenant is not None and fault.tenant != tenant:
                continue
            if fault.collection is not None and fault.collection != collection:
                continue
            if fault.offset is not None and fault.offset != offset:
                continue
            if chosen is not None and fault.kind != faults.FaultKind.LATENCY:
                continue
            if fault.probability < 1.0 and self._fault_rng.random() >= fault.probability:
                continue
            if armed.remaining is not None:
                armed.remaining -= 1
            self.faults_fired[fault.kind.value] += 1
            if fault.kind == faults.FaultKind.LATENCY:
                delay_s += fault.delay_s
            else:
                chosen = fault
        self._faults = [armed for armed in self._faults if armed.remaining != 0]
        return delay_s, chosen

    # --- pages -----------------------------------------------------------------------------

    def _view(self, tenant: str, query: queries.PageQuery, collection: str) -> list[dict[str, Any]]:
        """The items of the tenant's `collection`, filtered and (when asked) sorted; cached
        until data changes."""
        views = self._views.setdefault(tenant, {})
        key = (collection, query.sort, query.filter_key)
        view = views.get(key)
        if view is None:
            items = self.tenants[tenant].collection(collection)
            predicate = query.predicate
            view = [item for item in items if predicate(item)] if predicate else list(items)
            # Stable sorts, last key first, give a multi-key sort; missing values sort first.
            for name, descending in reversed(query.sort):
                view.sort(key=queries.sort_key(name), reverse=descending)
            views[key] = view
        return view

    def page_document(
        self, tenant: str, query: queries.PageQuery, collection: str = "backup_copy_job_objects"
    ) -> dict[str, Any]:
        """The page `query` asks of the items of `tenant`'s `collection`, as a fresh document
        a caller may edit (the items themselves are shared: replace them, do not change
        them)."""
        view = self._view(tenant, query, collection)
        total = len(view)
        if query.sort:
            data = view[query.offset : query.offset + query.limit]
        else:
            count = max(0, min(query.limit, total - query.offset))
            data = self._order_rng.sample(view, count)
        if query.select:
            data = [{name: item[name] for name in query.select if name in item} for item in data]
        return {
            "meta": {"pagingInfo": {"total": total, "count": len(data), "offset": query.offset}},
            "data": data,
            "errors": None,
        }

    def page_body(
        self, tenant: str, query: queries.PageQuery, collection: str = "backup_copy_job_objects"
    ) -> bytes:
        """`page_document` as JSON; sorted pages are cached until the tenant's data changes."""
        if not query.sort:
            return orjson.dumps(self.page_document(tenant, query, collection))
        pages = self._pages.setdefault(tenant, {})
        key = (collection, query.offset, query.limit, query.sort, query.filter_key, query.select)
        body = pages.get(key)
        if body is None:
            if len(pages) >= _PAGE_CACHE_ENTRIES:
                pages.clear()
            body = pages[key] = orjson.dumps(self.page_document(tenant, query, collection))
        return body

    @contextlib.contextmanager
    def serving_page(self, tenant: str) -> Iterator[None]:
        """Counts a collection request of `tenant` in `in_flight` while it is answered."""
        self.in_flight[tenant] += 1
        self.max_in_flight[tenant] = max(self.max_in_flight[tenant], self.in_flight[tenant])
        try:
            yield
        finally:
            self.in_flight[tenant] -= 1

    # --- async actions ---------------------------------------------------------------------

    def new_async_action(self, tenant: str, body: bytes, polls: int) -> str:
        """Queues `body` as the answer of a new async action of `tenant`; returns its id."""
        action_id = str(uuid.uuid4())
        self._async_actions[action_id] = AsyncAction(tenant, body, polls)
        while len(self._async_actions) > _ASYNC_ACTIONS_KEPT:
            self._async_actions.popitem(last=False)
        return action_id

    def async_action(self, action_id: str, tenant: str) -> AsyncAction | None:
        """The async action `tenant` queued as `action_id`, while it is kept."""
        action = self._async_actions.get(action_id)
        return action if action is not None and action.tenant == tenant else None
