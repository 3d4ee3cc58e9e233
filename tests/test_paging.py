"""Pure paging logic: offset planning, page checks, snapshot judgement."""

from __future__ import annotations

import random
import re
import time
import uuid
from typing import Any

import orjson
import pytest

from syncd import config, errors, paging

TENANT = "acme"
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128)))


def _items(count: int, seed: int = 0, *, unique: bool | None = True) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    for index in range(count):
        item: dict[str, Any] = {"jobUid": _uuid(rng), "linkedJobUid": _uuid(rng)}
        if unique is True or (unique is None and index % 2):
            item["uniqueJobUid"] = _uuid(rng)
        items.append(item)
    return items


def _body(
    data: list[Any],
    *,
    offset: int = 0,
    total: int | None = None,
    count: int | None = None,
    **overrides: Any,
) -> bytes:
    document: dict[str, Any] = {
        "meta": {
            "pagingInfo": {
                "total": len(data) if total is None else total,
                "count": len(data) if count is None else count,
                "offset": offset,
            }
        },
        "data": data,
        "errors": None,
    }
    document.update(overrides)
    return orjson.dumps(document)


def _parse(
    body: bytes, *, offset: int = 0, limit: int = 500, expected: int | None = None
) -> paging.Page:
    return paging.parse_page(
        body, tenant=TENANT, offset=offset, limit=limit, expected_total=expected
    )


def _problem(body: bytes, **kwargs: Any) -> errors.PageProblem:
    with pytest.raises(errors.PageProblem) as caught:
        _parse(body, **kwargs)
    problem = caught.value
    assert isinstance(problem, errors.TenantError)
    assert f"tenant {TENANT!r}" in str(problem)
    assert f"offset {problem.offset}" in str(problem)
    assert problem.field in str(problem)
    return problem


# --- SORT_PARAM ------------------------------------------------------------------------


def test_sort_param_sorts_on_all_three_fields_ascending() -> None:
    sort = orjson.loads(paging.SORT_PARAM)
    assert [entry["property"] for entry in sort] == ["jobUid", "linkedJobUid", "uniqueJobUid"]
    assert {entry["direction"] for entry in sort} == {"ascending"}


# --- plan_offsets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "page_size", "expected"),
    [
        (0, 500, []),
        (1, 500, []),
        (500, 500, []),
        (501, 500, [499]),
        (998, 500, [499]),
        (999, 500, [499]),
        (1000, 500, [499, 998]),
        (10, 5, [4, 8]),
        (9, 5, [4]),
        (5, 1, [1, 2, 3, 4]),
        (1, 1, []),
        (0, 1, []),
        (4, 2, [1, 2]),
        (2, 2, []),
    ],
)
def test_plan_offsets(total: int, page_size: int, expected: list[int]) -> None:
    assert list(paging.plan_offsets(total, page_size)) == expected


def test_plan_offsets_without_overlap() -> None:
    assert list(paging.plan_offsets(10, 5, overlap=False)) == [5]
    assert list(paging.plan_offsets(11, 5, overlap=False)) == [5, 10]


def test_plan_offsets_rejects_page_size_zero() -> None:
    with pytest.raises(ValueError, match="page_size"):
        paging.plan_offsets(10, 0)


@pytest.mark.parametrize("page_size", [1, 2, 3, 7, 100, 500])
def test_plan_offsets_covers_everything_with_one_shared_position(page_size: int) -> None:
    for total in [*range(0, 3 * page_size + 3), 10_007]:
        offsets = [0, *paging.plan_offsets(total, page_size)]
        ends = [min(offset + page_size, total) for offset in offsets]
        covered: set[int] = set()
        for offset, end in zip(offsets, ends, strict=True):
            covered.update(range(offset, end))
        assert covered == set(range(total)), (total, page_size)
        for previous_end, offset in zip(ends, offsets[1:], strict=False):
            assert previous_end - offset == (1 if page_size > 1 else 0), (total, page_size)
        # No wasted page: every page but the first starts inside the collection.
        assert all(offset < total for offset in offsets[1:])


# --- parse_page: good pages ----------------------------------------------------------------


def test_parse_page_returns_lowercase_pairs_in_order() -> None:
    items = _items(3)
    items[1] = {key: value.upper() for key, value in items[1].items()}
    page = _parse(_body(items, total=10), limit=3)
    assert (page.offset, page.total) == (0, 10)
    assert page.pairs == [
        (item["jobUid"].lower(), item["uniqueJobUid"].lower(), item["linkedJobUid"].lower())
        for item in items
    ]
    assert all(UUID_RE.fullmatch(value) for pair in page.pairs for value in pair if value)


@pytest.mark.parametrize("unique", [True, False, None])
def test_parse_page_unique_job_uid_is_optional(unique: bool | None) -> None:
    items = _items(6, unique=unique)
    if unique is None:
        items[0]["uniqueJobUid"] = None  # explicit null reads as absent
    page = _parse(_body(items))
    assert [pair[1] for pair in page.pairs] == [item.get("uniqueJobUid") for item in items]


def test_parse_page_later_page_exact_length() -> None:
    items = _items(4)
    page = _parse(_body(items, offset=8, total=12), offset=8, limit=5, expected=12)
    assert page.offset == 8 and page.total == 12 and len(page.pairs) == 4


def test_parse_page_empty_collection() -> None:
    page = _parse(_body([], total=0))
    assert page.pairs == [] and page.total == 0


def test_parse_page_first_page_may_be_shorter_than_asked() -> None:
    # A server whose MaxPageSize is below the limit asked for.
    page = _parse(_body(_items(3), total=100), limit=10)
    assert len(page.pairs) == 3 and page.total == 100


def test_parse_page_null_meta_on_first_page() -> None:
    page = _parse(_body(_items(2), meta=None), limit=5)
    assert page.has_paging_info is False
    assert page.total == 2


# --- parse_page: every check -------------------------------------------------------------


def test_unreadable_body() -> None:
    problem = _problem(b'{"meta": {"pagingInfo": {"total": 3,, "data": [')
    assert isinstance(problem, errors.UnreadablePage)
    assert problem.field == "body"


def test_truncated_body() -> None:
    body = _body(_items(5))
    assert isinstance(_problem(body[: len(body) // 2]), errors.UnreadablePage)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"[]", "body"),
        (b'{"data": null}', "data"),
        (b'{"meta": null}', "data"),
        (b'{"data": {}}', "data"),
        (b'{"data": [], "meta": []}', "meta"),
        (b'{"data": [], "meta": {"pagingInfo": 3}}', "meta.pagingInfo"),
        (
            b'{"data": [], "errors": [{"message": "boom", "type": "logical", "code": 1}]}',
            "errors",
        ),
    ],
)
def test_envelope_problems(body: bytes, field: str) -> None:
    problem = _problem(body)
    assert problem.field == field
    assert not isinstance(problem, errors.UnreadablePage)


def test_later_page_without_paging_info() -> None:
    problem = _problem(_body(_items(2), offset=4, meta=None), offset=4, limit=2, expected=6)
    assert problem.field == "meta.pagingInfo"
    assert "offset 4" in str(problem)


def test_first_page_without_paging_info_longer_than_limit() -> None:
    assert _problem(_body(_items(3), meta=None), limit=2).field == "data"


@pytest.mark.parametrize("key", ["total", "count", "offset"])
@pytest.mark.parametrize("value", [None, "3", -1, True, 2.0])
def test_paging_info_values_must_be_counts(key: str, value: Any) -> None:
    document = orjson.loads(_body(_items(2), total=2))
    document["meta"]["pagingInfo"][key] = value
    problem = _problem(orjson.dumps(document))
    assert problem.field == f"meta.pagingInfo.{key}"


def test_offset_must_echo() -> None:
    problem = _problem(_body(_items(2), offset=0, total=6), offset=4, limit=2, expected=6)
    assert problem.field == "meta.pagingInfo.offset"
    assert "offset 4" in str(problem)


def test_total_must_not_change() -> None:
    problem = _problem(_body(_items(2), offset=4, total=7), offset=4, limit=2, expected=6)
    assert problem.field == "meta.pagingInfo.total"
    assert "7" in str(problem) and "6" in str(problem)


def test_count_must_match_data() -> None:
    problem = _problem(_body(_items(2), total=2, count=3))
    assert problem.field == "meta.pagingInfo.count"


@pytest.mark.parametrize("length", [1, 3])
def test_later_page_length_must_be_exact(length: int) -> None:
    problem = _problem(_body(_items(length), offset=4, total=10), offset=4, limit=2, expected=10)
    assert problem.field == "data"


def test_first_page_may_not_be_longer_than_limit() -> None:
    assert _problem(_body(_items(3), total=10), limit=2).field == "data"


def test_first_page_may_not_be_empty_when_total_is_not() -> None:
    assert _problem(_body([], total=10), limit=2).field == "data"


@pytest.mark.parametrize(
    ("damage", "field"),
    [
        (lambda item: item.pop("jobUid"), "jobUid"),
        (lambda item: item.pop("linkedJobUid"), "linkedJobUid"),
        (lambda item: item.update(jobUid=None), "jobUid"),
        (lambda item: item.update(jobUid="not-a-uuid"), "jobUid"),
        (lambda item: item.update(linkedJobUid=12), "linkedJobUid"),
        (lambda item: item.update(uniqueJobUid="x" * 36), "uniqueJobUid"),
        (lambda item: item.update(uniqueJobUid=""), "uniqueJobUid"),
        (lambda item: item.update(jobUid=item["jobUid"].replace("-", "")), "jobUid"),
        (lambda item: item.update(jobUid="{" + item["jobUid"] + "}"), "jobUid"),
        (lambda item: item.update(jobUid=item["jobUid"] + "\n"), "jobUid"),
        (lambda item: item.update(jobUid=item["jobUid"][:-1] + "g"), "jobUid"),
    ],
)
def test_bad_items_fail_the_page_naming_index_and_field(damage: Any, field: str) -> None:
    items = _items(7, unique=None)
    damage(items[4])
    problem = _problem(_body(items))
    assert problem.field == f"data[4].{field}"


def test_item_that_is_not_an_object() -> None:
    items: list[Any] = _items(3)
    items[2] = ["a", "b"]
    assert _problem(_body(items)).field == "data[2]"


def test_first_bad_item_is_named() -> None:
    items = _items(5)
    items[1]["jobUid"] = "bad"
    items[3]["linkedJobUid"] = "bad"
    assert _problem(_body(items)).field == "data[1].jobUid"


def test_fast_validation_agrees_with_a_regex_per_value() -> None:
    """Random single-character damage: the joined-text check must reject exactly what a
    per-value regex rejects."""
    rng = random.Random(7)
    alphabet = "0123456789abcdefABCDEFg-\n {}xZ\u0130"
    for _ in range(3000):
        items = _items(rng.randint(1, 6), seed=rng.randint(0, 10**6), unique=None)
        index = rng.randrange(len(items))
        key = rng.choice(list(items[index]))
        value = items[index][key]
        position = rng.randrange(len(value) + 1)
        action = rng.randrange(3)
        if action == 0:
            value = value[:position] + rng.choice(alphabet) + value[position + 1 :]
        elif action == 1:
            value = value[:position] + rng.choice(alphabet) + value[position:]
        else:
            value = value[:position] + value[position + 1 :]
        items[index][key] = value
        valid = UUID_RE.fullmatch(value.lower()) is not None
        body = _body(items)
        if valid:
            position_in_pair = {"jobUid": 0, "uniqueJobUid": 1, "linkedJobUid": 2}[key]
            assert _parse(body).pairs[index][position_in_pair] == value.lower()
        else:
            assert _problem(body).field == f"data[{index}].{key}"


def test_parse_page_is_fast() -> None:
    body = _body(_items(500), total=1_000_000)
    started = time.process_time()
    for _ in range(200):
        _parse(body)
    # 100,000 items; about 0.05 s here. The budget is 1,000,000 in well under 2 s.
    assert time.process_time() - started < 0.5


# --- SnapshotTracker ---------------------------------------------------------------------


def _pages(items: list[dict[str, Any]], page_size: int) -> list[paging.Page]:
    total = len(items)
    pages = []
    for offset in [0, *paging.plan_offsets(total, page_size)]:
        chunk = items[offset : offset + page_size]
        pages.append(
            _parse(
                _body(chunk, offset=offset, total=total),
                offset=offset,
                limit=page_size,
                expected=None if offset == 0 else total,
            )
        )
    return pages


@pytest.mark.parametrize(("total", "page_size"), [(0, 5), (1, 5), (5, 5), (23, 5), (7, 2), (9, 2)])
def test_tracker_complete(total: int, page_size: int) -> None:
    pages = _pages(_items(total), page_size)
    tracker = paging.SnapshotTracker(tenant=TENANT, limit=page_size, max_total=10**7)
    assert list(tracker.start(pages[0])) == [page.offset for page in pages[1:]]
    for page in reversed(pages[1:]):  # any order
        tracker.record(page)
    outcome = tracker.outcome()
    assert outcome == paging.SnapshotOutcome(
        complete=True, total=total, pages_fetched=len(pages), items_seen=total, problems=()
    )


def test_tracker_detects_drift() -> None:
    items = _items(14)
    pages = _pages(items, 5)  # offsets 0, 4, 8, 12
    shifted = items[:6] + items[7:] + _items(1, seed=99)  # one removed before position 8
    tracker = paging.SnapshotTracker(tenant=TENANT, limit=5, max_total=10**7)
    tracker.start(pages[0])
    tracker.record(pages[1])
    tracker.record(_parse(_body(shifted[8:13], offset=8, total=14), offset=8, limit=5, expected=14))
    tracker.record(pages[3])
    outcome = tracker.outcome()
    assert not outcome.complete
    assert any("drift between offsets 4 and 8" in problem for problem in outcome.problems)
    assert all(f"tenant {TENANT!r}" in problem for problem in outcome.problems)


def test_pages_of_one_item_are_refused_they_cannot_show_drift() -> None:
    # Found by the snapshot fuzzer: with one-item pages, an insert and a delete between two
    # fetches shift a pair out of every page, and nothing shows it.
    with pytest.raises(ValueError, match="at least 2"):
        paging.SnapshotTracker(tenant=TENANT, limit=1, max_total=10**7)
    with pytest.raises(errors.ConfigError, match="page_size"):
        config.validate_config({"sync": {"page_size": 1}}, environ={})


def test_tracker_failed_page_leaves_a_gap() -> None:
    pages = _pages(_items(14), 5)
    tracker = paging.SnapshotTracker(tenant=TENANT, limit=5, max_total=10**7)
    tracker.start(pages[0])
    tracker.record(pages[1])
    tracker.record(pages[3])
    tracker.record_failure("tenant 'acme', offset 8: HTTP 520 (gave up after 5 retries)")
    outcome = tracker.outcome()
    assert not outcome.complete
    assert outcome.pages_fetched == 3
    assert outcome.items_seen == 11
    assert outcome.problems[0].startswith("tenant 'acme', offset 8: HTTP 520")
    assert outcome.problems[1:] == (
        f"tenant {TENANT!r}: positions 9..11 of 14 were not covered by any page that passed",
    )


def test_tracker_missing_last_page_is_a_gap() -> None:
    pages = _pages(_items(14), 5)
    tracker = paging.SnapshotTracker(tenant=TENANT, limit=5, max_total=10**7)
    tracker.start(pages[0])
    tracker.record(pages[1])
    tracker.record(pages[2])
    outcome = tracker.outcome()
    assert not outcome.complete
    assert outcome.items_seen == 13
    assert outcome.problems == (
        f"tenant {TENANT!r}: positions 13..13 of 14 were not covered by any page that passed",
    )


def test_a_short_first_page_fails_naming_page_size_and_never_shrinks_the_plan() -> None:
    first = _parse(_body(_items(3), total=10), limit=5)
    tracker = paging.SnapshotTracker(tenant=TENANT, limit=5, max_total=10**7)
    with pytest.raises(errors.PageProblem, match=r"3 items for limit 5 .*page_size = 3"):
        tracker.start(first)


def test_a_one_item_first_page_with_a_huge_total_plans_nothing() -> None:
    first = _parse(_body(_items(1), total=10**6), limit=500)
    tracker = paging.SnapshotTracker(tenant=TENANT, limit=500, max_total=10**7)
    with pytest.raises(errors.PageProblem, match="page_size"):
        tracker.start(first)


def test_a_total_above_max_total_is_refused_naming_the_key() -> None:
    first = _parse(_body(_items(5), total=10**12), limit=5)
    tracker = paging.SnapshotTracker(tenant=TENANT, limit=5, max_total=10**7)
    with pytest.raises(errors.BoundExceeded, match="max_total") as raised:
        tracker.start(first)
    assert raised.value.key == "max_total"


def test_the_plan_is_lazy_whatever_the_total() -> None:
    offsets = paging.plan_offsets(10**15, 500)
    assert isinstance(offsets, range)
    assert len(offsets) > 10**12 and offsets[0] == 499 and offsets[1] == 998


def test_tracker_null_meta_short_page_is_the_whole_collection() -> None:
    first = _parse(_body(_items(3), meta=None), limit=5)
    tracker = paging.SnapshotTracker(tenant=TENANT, limit=5, max_total=10**7)
    assert list(tracker.start(first)) == []
    assert tracker.outcome() == paging.SnapshotOutcome(True, 3, 1, 3, ())


def test_tracker_null_meta_full_page_is_incomplete() -> None:
    first = _parse(_body(_items(5), meta=None), limit=5)
    tracker = paging.SnapshotTracker(tenant=TENANT, limit=5, max_total=10**7)
    assert list(tracker.start(first)) == []
    outcome = tracker.outcome()
    assert not outcome.complete and outcome.total is None
    assert "offset 0: meta.pagingInfo: missing" in outcome.problems[0]
    assert f"tenant {TENANT!r}" in outcome.problems[0]


# --- packed pairs, digests and snapshot keys ---------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # Values of 35 and 37 characters: concatenated without separators, two good ones.
        ("1" * 8 + "-1111-1111-1111-" + "1" * 11, "a" + "1" * 8 + "-1111-1111-1111-" + "1" * 12),
        # A value holding a newline where a hex digit belongs, or other whitespace.
        ("1" * 8 + "-1111-1111-1111-" + "1" * 11 + "\n", "1" * 8 + "-1111-1111-1111-" + "1" * 12),
        ("1" * 8 + "-1111-1111-1111-" + "1" * 11 + " ", "1" * 8 + "-1111-1111-1111-" + "1" * 12),
        # A stray hyphen and a two-byte character: the right count of bytes, not hex.
        (
            "-\u00e9" + "1" * 6 + "-1111-1111-1111-" + "1" * 12,
            "1" * 8 + "-1111-1111-1111-" + "1" * 12,
        ),
        # Non-ASCII digits and a hyphen out of place.
        ("\u0661" * 8 + "-1111-1111-1111-" + "1" * 12, "1" * 8 + "-1111-1111-1111-" + "1" * 12),
        ("1" * 8 + "-1111-1111-1111-" + "1" * 12, "1" * 8 + "-1111-1111-111-1" + "1" * 12),
    ],
)
def test_crafted_values_that_pack_to_valid_bytes_are_rejected(first: str, second: str) -> None:
    items = _items(2)
    items[0]["jobUid"], items[1]["jobUid"] = first, second
    problem = _problem(_body(items))
    assert problem.field in ("data[0].jobUid", "data[1].jobUid")


def test_packed_pairs_are_canonical_whatever_the_case() -> None:
    items = _items(4, unique=None)
    upper = [{key: value.upper() for key, value in item.items()} for item in items]
    lower, shouted = _parse(_body(items)), _parse(_body(upper))
    assert lower.block == shouted.block and lower.digest == shouted.digest
    assert lower.block.uniques[: paging.UUID_BYTES] == paging.NIL_BYTES  # absent: nil
    other = _parse(_body([*items[:3], _items(1, seed=9)[0]]))
    assert other.digest != lower.digest


def test_snapshot_key_is_total_page_size_and_every_page_digest_in_order() -> None:
    items = _items(23)
    pages = _pages(items, 5)

    def outcome(pages: list[paging.Page]) -> paging.SnapshotOutcome:
        tracker = paging.SnapshotTracker(tenant=TENANT, limit=5, max_total=10**7)
        tracker.start(pages[0])
        for page in reversed(pages[1:]):
            tracker.record(page)
        return tracker.outcome()

    key = outcome(pages).key()
    assert key is not None and (key.total, key.page_size) == (23, 5)
    assert key.digests == b"".join(page.digest for page in pages)
    assert all(key.matches(page) for page in pages)
    assert outcome(_pages(items, 5)).key() == key  # the same items: the same key

    changed = [*items[:12], _items(1, seed=7)[0], *items[13:]]
    other = _pages(changed, 5)
    assert outcome(other).key() != key
    assert [key.matches(page) for page in other] == [page.offset not in (8, 12) for page in other]
    assert outcome(pages[:-1]).key() is None  # incomplete: no key
