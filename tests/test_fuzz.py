"""Property-based fuzzing of what a hostile server or file can put in front of syncd.

- `parse_page` over arbitrary bytes and arbitrary JSON: it returns a checked page or raises
  one of syncd's own errors, nothing else.
- The snapshot tracker over page sequences from a server whose collection changes between
  page fetches, with pages fetched in any order and some failing: when it calls a snapshot
  complete, every pair present throughout the snapshot was delivered, so a run can never
  remove a pair the server kept.
- `validate_config` and `load_config` over arbitrary documents and bytes: a `Config` or a
  `ConfigError`, nothing else.

Run with `--hypothesis-show-statistics` to see how many examples each property ran.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd import config, errors, paging

TENANT = "fuzz"
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SNAPSHOTS = settings(max_examples=600, deadline=None)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=25,
)
uuids = st.uuids().map(str)
maybe_uuid = uuids | st.text(max_size=40) | st.integers(-(2**63), 2**63) | st.none()
items = st.fixed_dictionaries(
    {"jobUid": maybe_uuid, "linkedJobUid": maybe_uuid},
    optional={"uniqueJobUid": maybe_uuid, "extra": json_values},
)
paging_info = st.fixed_dictionaries(
    {},
    optional={
        "total": st.integers(min_value=-3, max_value=10**13) | json_scalars,
        "count": st.integers(min_value=-3, max_value=60) | json_scalars,
        "offset": st.integers(min_value=-3, max_value=60) | json_scalars,
    },
)
page_documents = st.fixed_dictionaries(
    {},
    optional={
        "data": st.lists(items, max_size=8) | json_values,
        "meta": st.fixed_dictionaries({}, optional={"pagingInfo": paging_info | json_values})
        | json_values,
        "errors": st.none() | json_values,
    },
)


def _parse(body: bytes, offset: int, limit: int, expected_total: int | None) -> None:
    try:
        page = paging.parse_page(
            body, tenant=TENANT, offset=offset, limit=limit, expected_total=expected_total
        )
    except errors.SyncdError:
        return
    assert page.offset == offset and len(page.pairs) <= limit
    assert all(len(job) == 36 and len(linked) == 36 for job, _, linked in page.pairs)


@FUZZ
@given(
    body=st.binary(max_size=300),
    offset=st.integers(0, 50),
    limit=st.integers(1, 10),
    expected_total=st.none() | st.integers(0, 100),
)
def test_parse_page_survives_arbitrary_bytes(
    body: bytes, offset: int, limit: int, expected_total: int | None
) -> None:
    _parse(body, offset, limit, expected_total)


@FUZZ
@given(
    document=page_documents | json_values,
    offset=st.integers(0, 50),
    limit=st.integers(1, 10),
    expected_total=st.none() | st.integers(0, 100),
)
def test_parse_page_survives_arbitrary_json(
    document: Any, offset: int, limit: int, expected_total: int | None
) -> None:
    _parse(orjson.dumps(document), offset, limit, expected_total)


# --- snapshots from a changing server ---------------------------------------------------------

Pair = tuple[str, str | None, str]


def _pair(draw: st.DrawFn) -> Pair:
    job = str(uuid.UUID(int=draw(st.integers(0, 15))))
    linked = str(uuid.UUID(int=draw(st.integers(0, 15))))
    unique = draw(st.none() | st.integers(1, 3).map(lambda n: str(uuid.UUID(int=n))))
    return (job, unique, linked)


def _sort_key(pair: Pair) -> tuple[str, str, str]:
    return (pair[0], pair[2], pair[1] or "")  # the order syncd asks for


def _body(state: list[Pair], offset: int, limit: int) -> bytes:
    ordered = sorted(state, key=_sort_key)
    data = [
        {"jobUid": job, "linkedJobUid": linked, **({"uniqueJobUid": unique} if unique else {})}
        for job, unique, linked in ordered[offset : offset + limit]
    ]
    info = {"total": len(ordered), "count": len(data), "offset": offset}
    return orjson.dumps({"data": data, "meta": {"pagingInfo": info}, "errors": None})


@st.composite
def snapshots(draw: st.DrawFn) -> tuple[list[Pair], int, list[tuple[str, Any]]]:
    """(initial collection, page size, script of page fetches and changes between them)."""
    size = draw(st.integers(0, 40))
    pairs: dict[Pair, None] = {}
    for _ in range(size):
        pairs[_pair(draw)] = None
    initial = list(pairs)
    limit = draw(st.integers(2, 7))  # the smallest page syncd plans (config: page_size >= 2)
    steps = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("insert"), st.builds(lambda: None)),
                st.tuples(st.just("delete"), st.integers(0, 1000)),
                st.tuples(st.just("fail"), st.integers(0, 1000)),
                st.tuples(st.just("fetch"), st.integers(0, 1000)),
            ),
            max_size=40,
        )
    )
    script: list[tuple[str, Any]] = []
    for kind, value in steps:
        script.append((kind, _pair(draw) if kind == "insert" else value))
    return initial, limit, script


@FUZZ_SNAPSHOTS
@given(snapshots())
def test_a_complete_snapshot_holds_every_pair_present_throughout(
    case: tuple[list[Pair], int, list[tuple[str, Any]]],
) -> None:
    initial, limit, script = case
    state = list(initial)
    tracker = paging.SnapshotTracker(tenant=TENANT, limit=limit, max_total=10**7)
    first = paging.parse_page(
        _body(state, 0, limit), tenant=TENANT, offset=0, limit=limit, expected_total=None
    )
    received: set[Pair] = set(first.pairs)
    present_throughout = set(state)
    pending = list(tracker.start(first))
    for kind, value in script:
        if not pending:
            break
        if kind == "insert" and value not in state:
            state.append(value)
        elif kind == "delete" and state:
            state.pop(value % len(state))
        elif kind in ("fetch", "fail"):
            offset = pending.pop(value % len(pending))  # pages arrive in any order
            if kind == "fail":
                tracker.record_failure(f"offset {offset}: failed")
                continue
            try:
                page = paging.parse_page(
                    _body(state, offset, limit),
                    tenant=TENANT,
                    offset=offset,
                    limit=limit,
                    expected_total=tracker.total,
                )
            except errors.PageProblem as exc:
                tracker.record_failure(str(exc))
                continue
            tracker.record(page)
            received.update(page.pairs)
        present_throughout &= set(state)
    for offset in pending:  # the rest, fetched after the last change
        page_body = _body(state, offset, limit)
        try:
            page = paging.parse_page(
                page_body, tenant=TENANT, offset=offset, limit=limit, expected_total=tracker.total
            )
        except errors.PageProblem as exc:
            tracker.record_failure(str(exc))
            continue
        tracker.record(page)
        received.update(page.pairs)
    outcome = tracker.outcome()
    if outcome.complete:
        missing = present_throughout - received
        assert not missing, f"complete snapshot missed {missing}"


# --- configuration files ------------------------------------------------------------------------

config_keys = st.sampled_from(
    [
        "name",
        "url",
        "api_key",
        "api_key_env",
        "api_key_file",
        "username",
        "password",
        "password_file",
        "verify_tls",
        "ca_file",
        "page_size",
        "interval",
        "cron",
        "max_total",
        "max_body_size",
        "run_timeout",
        "client_version",
        "sync_overrides",
        "unknown",
    ]
)
config_values = json_scalars | st.sampled_from(
    ["15m", "1MiB", "https://vspc.example.com", "http://u:p@h", "/dev/zero", "* * * * *", "", "0"]
)
tenant_tables = st.dictionaries(config_keys, config_values, max_size=8)
config_documents = st.fixed_dictionaries(
    {},
    optional={
        "database": st.dictionaries(
            st.sampled_from(["url", "pool_size", "statement_timeout", "x"]),
            config_values
            | st.sampled_from(
                ["postgresql://u@h:x/d", "postgresql://u@h/d?sslmode=no", "postgres://u:p@h/d"]
            ),
        )
        | json_values,
        "sync": st.dictionaries(config_keys, config_values, max_size=6) | json_values,
        "daemon": st.dictionaries(
            st.sampled_from(["listen", "max_concurrent_tenants", "shutdown_grace"]), config_values
        )
        | json_values,
        "tenants": st.lists(tenant_tables | json_values, max_size=4) | json_values,
    },
)


@FUZZ
@given(document=config_documents | st.dictionaries(st.text(max_size=10), json_values))
def test_validate_config_raises_only_config_errors(document: dict[str, Any]) -> None:
    try:
        config.validate_config(document, environ={}, base_dir=Path("/nonexistent"))
    except errors.ConfigError as exc:
        assert exc.problems
        assert all(isinstance(problem, str) and problem for problem in exc.problems)


@settings(max_examples=200, deadline=None)
@given(content=st.binary(max_size=400))
def test_load_config_raises_only_config_errors(
    content: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "syncd.toml"
    path.write_bytes(content)
    with contextlib.suppress(errors.ConfigError):
        config.load_config(path, environ={})
