"""Paging over a VSPC collection as pure logic: plan offsets, check pages, judge.

No I/O here (the requests are sent by `vspc.py`). A snapshot is read with overlapping pages:
consecutive pages share one position, so an insert or delete between two page fetches shows
up as a mismatch at the shared position ("drift"). Every page is checked against what was
asked for (offset echoed, count, total unchanged, every item valid for its collection), and
the snapshot is complete only when every position 0..total-1 was covered by a page that
passed. Link collections parse into `Pair`s on a fast path (millions of them); catalog
collections into `Record`s holding only the fields their spec names.

What one shared position cannot see: an insert and a delete on the same side of a page
boundary, between the fetches of the two pages, cancel out there. A pair added mid-snapshot
may then be missed (and one removed mid-snapshot still delivered) until the next snapshot;
a pair present throughout is never missed without a reported drift.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson

from syncd import collections, errors
from syncd.collections import Collection, FieldType

Pair = tuple[str, str | None, str]
"""(job_uid, unique_job_uid or None, linked_job_uid), lowercase canonical UUID text."""

MAX_PAGE_SIZE = 500  # VSPC's default MaxPageSize, the documented maximum of `limit`
_INT_BOUND = 2**63


def sort_param(collection: Collection) -> str:
    """The `sort` query parameter asking for `collection` in its total order."""
    return orjson.dumps(
        [{"property": name, "direction": "ascending"} for name in collection.sort]
    ).decode()


SORT_PARAM: str = sort_param(collections.BACKUP_COPY_JOB_OBJECTS)
"""The links collections' sort: on all three fields, so no ties and a total order."""


@dataclass(frozen=True, slots=True)
class Record:
    """One catalog item: its identity and the fields its collection keeps, as JSON objects
    (keys are VSPC's; absent and null fields are left out)."""

    uid: str
    attributes: str  # descriptive fields: a change opens a new version
    volatile: str  # current-only fields


_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UUID_LEN = 36
UUID_BYTES = 16
# VSPC never issues the nil UUID; links store it for "no uniqueJobUid" so that the pair's
# identity is four plain NOT NULL columns: equality joins and a plain unique index work, where
# NULL would need IS NOT DISTINCT FROM (no hash joins) or NULLS NOT DISTINCT. The views turn it
# back into NULL.
NIL_BYTES = bytes(UUID_BYTES)
NO_UNIQUE_JOB_UID = str(UUID(bytes=NIL_BYTES))
DIGEST_BYTES = 16
# A record's three string objects and the record itself, beyond their characters.
_RECORD_OVERHEAD_BYTES = 4 * 56
_HYPHENS = (8, 13, 18, 23)
_REQUIRED = ("jobUid", "linkedJobUid")
_VALUE_PREVIEW = 60


@dataclass(frozen=True, slots=True)
class PairBlock:
    """The pairs of one page, packed: the i-th pair is the i-th 16 bytes of each field.

    Packed bytes, not a tuple of strings per pair: a page is checked, hashed, compared and
    turned into COPY rows by a few C-level operations over whole fields, whatever its
    length. An absent `uniqueJobUid` is the nil UUID (as stored).
    """

    count: int
    jobs: bytes
    uniques: bytes
    links: bytes

    def key(self, index: int) -> bytes:
        """The identity of the pair at `index` (48 bytes), for overlap checks."""
        start, end = index * UUID_BYTES, (index + 1) * UUID_BYTES
        return self.jobs[start:end] + self.uniques[start:end] + self.links[start:end]

    def pairs(self) -> list[Pair]:
        """The pairs as canonical text (slow: for tests and tools, not the sync path)."""
        return [
            (
                str(UUID(bytes=self.jobs[i : i + UUID_BYTES])),
                None
                if self.uniques[i : i + UUID_BYTES] == NIL_BYTES
                else str(UUID(bytes=self.uniques[i : i + UUID_BYTES])),
                str(UUID(bytes=self.links[i : i + UUID_BYTES])),
            )
            for i in range(0, self.count * UUID_BYTES, UUID_BYTES)
        ]


EMPTY_BLOCK = PairBlock(0, b"", b"", b"")


@dataclass(frozen=True, slots=True)
class Page:
    """One checked page of a collection.

    `block` (links collections) or `records` (catalog collections) holds every item of the
    page in server order, including the item this page shares with the previous one; the
    other is empty. `has_paging_info` is False when the server sent no `meta.pagingInfo`
    (allowed on a first page only); `total` is then the item count. `digest` identifies
    the page's items in their order (equal items, equal digest): a snapshot whose pages
    all have the digests of the one stored is the one stored.
    """

    offset: int
    total: int
    block: PairBlock = EMPTY_BLOCK
    has_paging_info: bool = True
    records: list[Record] = field(default_factory=list)
    digest: bytes = b""

    @property
    def count(self) -> int:
        """Items on the page."""
        return self.block.count or len(self.records)

    @property
    def pairs(self) -> list[Pair]:
        """The page's pairs as text (slow; see `PairBlock.pairs`)."""
        return self.block.pairs()

    def size_bytes(self) -> int:
        """About the memory its items hold (packed pairs; catalog records' text)."""
        packed = 3 * UUID_BYTES * self.block.count
        return packed + sum(
            _RECORD_OVERHEAD_BYTES + len(r.uid) + len(r.attributes) + len(r.volatile)
            for r in self.records
        )

    def edge_keys(self) -> tuple[object, object] | None:
        """Identity of the first and the last item (what overlapping pages compare)."""
        if self.block.count:
            return self.block.key(0), self.block.key(self.block.count - 1)
        if self.records:
            return self.records[0].uid, self.records[-1].uid
        return None


@dataclass(frozen=True)
class SnapshotOutcome:
    """How a snapshot went.

    `complete` means every planned page was fetched and checked, and positions 0..total-1
    are all covered; only then may a consumer treat what it received as the whole set.
    `items_seen` counts distinct positions covered (the shared items count once).
    """

    complete: bool
    total: int | None
    pages_fetched: int
    items_seen: int
    problems: tuple[str, ...]
    # The pages' digests in offset order, for a complete snapshot (else empty), and the
    # page size they were read with: with `total`, what identifies the snapshot's contents
    # (`key`). Not part of the judgement, so not compared.
    digests: bytes = field(default=b"", compare=False)
    page_size: int = field(default=0, compare=False)

    def key(self) -> SnapshotKey | None:
        """What identifies this snapshot's contents; None unless it is complete."""
        if not self.complete or self.total is None:
            return None
        return SnapshotKey(self.total, self.page_size, self.digests)


@dataclass(frozen=True)
class SnapshotKey:
    """The identity of a complete snapshot's contents: its total, the page size it was read
    with and every page's digest in order.

    Pages come in the collection's total order (`sort_param`) and the plan of pages follows
    from total and page size, so equal contents give equal keys; a different item anywhere
    changes its page's 128-bit digest. Compare with `matches` page by page as they arrive.
    """

    total: int
    page_size: int
    digests: bytes

    def matches(self, page: Page) -> bool:
        """True when `page` is, by its digest, the page at its offset in this snapshot."""
        if page.total != self.total or not page.has_paging_info:
            return False
        stride = self.page_size - 1
        index = page.offset // stride if stride > 0 else -1
        if index < 0 or index * stride != page.offset:
            return False
        start = index * DIGEST_BYTES
        stored = self.digests[start : start + DIGEST_BYTES]
        return len(stored) == DIGEST_BYTES and stored == page.digest


def plan_offsets(total: int, page_size: int, *, overlap: bool = True) -> range:
    """Offsets to fetch after the first page (offset 0) so that 0..total-1 are covered.

    A `range`: produced lazily, whatever `total` a server claims. With `overlap`, pages
    advance by `page_size - 1` so each shares its first position with the previous page's
    last; a page size of 1 cannot overlap and advances by 1.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, not {page_size}")
    stride = page_size - 1 if overlap and page_size > 1 else page_size
    # Page k covers [k*stride, k*stride + page_size): n later pages, the last reaching total.
    later_pages = max(0, -(-(total - page_size) // stride))
    return range(stride, stride * later_pages + 1, stride)


def parse_page(
    body: bytes,
    *,
    tenant: str,
    offset: int,
    limit: int,
    expected_total: int | None,
    collection: Collection = collections.BACKUP_COPY_JOB_OBJECTS,
) -> Page:
    """Decodes and checks one page of `collection`; raises `errors.PageProblem` naming
    tenant, offset and field.

    `expected_total` is the total the first page reported, or None when this IS the first
    page: the first page may then hold fewer items than asked for (a server whose
    MaxPageSize is below `limit`), and may lack `meta` altogether. Any later page must
    echo its offset, report the same total and hold exactly min(limit, total - offset)
    items. Raises `errors.UnreadablePage` when the body is not JSON at all.
    """
    where = f"tenant {tenant!r}, offset {offset}"

    def problem(field_name: str, what: str) -> errors.PageProblem:
        return errors.PageProblem(
            f"{where}: {field_name}: {what}", tenant=tenant, offset=offset, field=field_name
        )

    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.UnreadablePage(
            f"{where}: body: not valid JSON, truncated or malformed ({exc})",
            tenant=tenant,
            offset=offset,
            field="body",
        ) from exc
    if not isinstance(document, dict):
        raise problem("body", f"not a JSON object but {type(document).__name__}")
    server_errors = document.get("errors")
    if server_errors:
        raise problem("errors", f"the answer carries errors: {_preview(server_errors)}")
    data = document.get("data")
    if not isinstance(data, list):
        raise problem("data", "missing" if data is None else "not a list")
    meta = document.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise problem("meta", "not an object")
    paging_info = meta.get("pagingInfo") if meta is not None else None

    if paging_info is None:
        if expected_total is not None or offset != 0:
            raise problem(
                "meta.pagingInfo",
                "missing (meta is null): cannot check the offset and total of a later page",
            )
        if len(data) > limit:
            raise problem("data", f"{len(data)} items, more than the limit {limit}")
        return _page(offset, len(data), data, collection, problem, has_paging_info=False)

    if not isinstance(paging_info, dict):
        raise problem("meta.pagingInfo", "not an object")
    total = _count(paging_info, "total", problem)
    count = _count(paging_info, "count", problem)
    echoed = _count(paging_info, "offset", problem)
    if echoed != offset:
        raise problem("meta.pagingInfo.offset", f"{echoed}, but offset {offset} was asked for")
    if expected_total is not None and total != expected_total:
        raise problem("meta.pagingInfo.total", f"{total}, but the first page said {expected_total}")
    if count != len(data):
        raise problem("meta.pagingInfo.count", f"{count}, but data holds {len(data)} items")
    expected_len = max(0, min(limit, total - offset))
    if expected_total is None:
        if len(data) > expected_len or (expected_len > 0 and not data):
            raise problem("data", f"{len(data)} items, expected 1..{expected_len} (total {total})")
    elif len(data) != expected_len:
        raise problem(
            "data",
            f"{len(data)} items, expected {expected_len} (limit {limit}, total {total})",
        )
    return _page(offset, total, data, collection, problem)


def _page(
    offset: int,
    total: int,
    data: list[object],
    collection: Collection,
    problem: _ProblemFactory,
    *,
    has_paging_info: bool = True,
) -> Page:
    # SHA-256 (truncated): hardware-accelerated on current CPUs, twice BLAKE2b's speed here.
    digest = hashlib.sha256()
    if collection.kind is collections.Kind.LINKS:
        block = _pair_block(data, problem)
        digest.update(block.jobs)
        digest.update(block.uniques)
        digest.update(block.links)
        return Page(offset, total, block, has_paging_info, digest=digest.digest()[:DIGEST_BYTES])
    records = _records(data, collection, problem)
    for record in records:
        digest.update(f"{record.uid}\x1f{record.attributes}\x1f{record.volatile}\x1e".encode())
    return Page(
        offset, total, EMPTY_BLOCK, has_paging_info, records, digest.digest()[:DIGEST_BYTES]
    )


class SnapshotTracker:
    """The state of one snapshot: plans it from the first page, checks it as pages arrive.

    Keeps only the first and last identity of each page (enough for the overlap check), so
    memory grows with the number of pages, not items, and the number of pages is bounded
    by `max_total / limit`. Pages may be recorded in any order.
    """

    def __init__(self, *, tenant: str, limit: int, max_total: int) -> None:
        self.tenant = tenant
        if limit < 2:
            # Pages of one item cannot share an item with their neighbours: drift between
            # fetches would go unseen and a complete-looking snapshot could miss a pair.
            raise ValueError(f"a snapshot needs pages of at least 2 items, not {limit}")
        self.limit = limit
        self.max_total = max_total
        self.total: int | None = None
        self._edges: dict[int, _Edges] = {}
        self._problems: list[str] = []

    def start(self, first: Page) -> range:
        """Records the first page; returns the offsets still to fetch, `limit` items each.

        Raises `errors.BoundExceeded` when the server claims more than `max_total` items,
        and `errors.PageProblem` when it served fewer items than asked for: the page size
        is the one requested, never learned from a short page (a server that claims
        millions of items and sends one would otherwise plan millions of requests).
        """
        count = first.count
        if not first.has_paging_info:
            if count >= self.limit:
                self._problems.append(
                    f"tenant {self.tenant!r}, offset 0: meta.pagingInfo: missing (meta is "
                    f"null) and the page is full ({count} items for limit {self.limit}): "
                    "cannot tell whether more items exist"
                )
                self.record(first)
                return range(0)
            self.total = count
            self.record(first)
            return range(0)
        if first.total > self.max_total:
            raise errors.BoundExceeded(
                f"tenant {self.tenant!r}: the server reports {first.total} items, more than "
                f"max_total ({self.max_total}); if that many are real, raise [sync] max_total",
                key="max_total",
            )
        if count < min(self.limit, first.total):
            raise errors.PageProblem(
                f"tenant {self.tenant!r}, offset 0: data: {count} items for limit "
                f"{self.limit} of {first.total}: the server serves smaller pages than asked "
                f"for; set [sync] page_size = {max(count, 2)} for this tenant",
                tenant=self.tenant,
                offset=0,
                field="data",
            )
        self.total = first.total
        self.record(first)
        return plan_offsets(first.total, self.limit)

    def record(self, page: Page) -> None:
        """Notes a page that passed `parse_page`."""
        edges = page.edge_keys()
        if edges is not None:
            self._edges[page.offset] = _Edges(page.count, *edges, page.digest)
        else:
            self._edges[page.offset] = _Edges(0, None, None, page.digest)

    def record_failure(self, reason: str) -> None:
        """Notes a page that could not be fetched or failed a check (reason names both)."""
        self._problems.append(reason)

    def outcome(self) -> SnapshotOutcome:
        """Judges the snapshot from what was recorded."""
        problems = list(self._problems)
        items_seen = 0
        if self.total is not None:
            items_seen = self._check_coverage(self.total, problems)
        elif self._edges:
            items_seen = max(edges.count for edges in self._edges.values())
        complete = self.total is not None and not problems
        return SnapshotOutcome(
            complete=complete,
            total=self.total,
            pages_fetched=len(self._edges),
            items_seen=items_seen,
            problems=tuple(problems),
            digests=b"".join(self._edges[offset].digest for offset in sorted(self._edges))
            if complete
            else b"",
            page_size=self.limit,
        )

    def _check_coverage(self, total: int, problems: list[str]) -> int:
        covered_end = 0
        seen = 0
        previous: tuple[int, _Edges] | None = None
        for offset in sorted(self._edges):
            edges = self._edges[offset]
            if offset > covered_end:
                problems.append(
                    f"tenant {self.tenant!r}: positions {covered_end}..{offset - 1} of "
                    f"{total} were not covered by any page that passed"
                )
            if previous is not None:
                previous_offset, previous_edges = previous
                shared = previous_offset + previous_edges.count - offset
                if shared == 1 and previous_edges.last != edges.first:
                    problems.append(
                        f"tenant {self.tenant!r}: drift between offsets {previous_offset} and "
                        f"{offset}: the item at position {offset} changed between the two "
                        "fetches (items were added or removed while paging)"
                    )
            end = offset + edges.count
            seen += max(0, end - max(offset, covered_end))
            covered_end = max(covered_end, end)
            previous = (offset, edges)
        if covered_end < total:
            problems.append(
                f"tenant {self.tenant!r}: positions {covered_end}..{total - 1} of {total} "
                "were not covered by any page that passed"
            )
        return seen


@dataclass(frozen=True, slots=True)
class _Edges:
    count: int
    first: object
    last: object
    digest: bytes


_ProblemFactory = Callable[[str, str], errors.PageProblem]


def _count(paging_info: dict[str, object], key: str, problem: _ProblemFactory) -> int:
    value = paging_info.get(key)
    if type(value) is not int or value < 0:
        raise problem(f"meta.pagingInfo.{key}", f"not a non-negative integer: {_preview(value)}")
    return value


def _pair_block(data: list[object], problem: _ProblemFactory) -> PairBlock:
    """The pairs of `data`, packed; raises the first item problem found.

    The fast path checks and packs each field over all items at once (one joined string,
    C-level operations; no object per pair); only when that fails does the slow path walk
    the items to name the first bad one.
    """
    count = len(data)
    if not count:
        return EMPTY_BLOCK
    try:
        jobs = _packed_uuids("\n".join([item["jobUid"] for item in data]), count)  # type: ignore[index]
        links = _packed_uuids("\n".join([item["linkedJobUid"] for item in data]), count)  # type: ignore[index]
        uniques = _packed_uuids(
            "\n".join(
                [
                    NO_UNIQUE_JOB_UID if (unique := item.get("uniqueJobUid")) is None else unique  # type: ignore[attr-defined]
                    for item in data
                ]
            ),
            count,
        )
    except (KeyError, TypeError, AttributeError):
        raise _first_bad_item(data, problem) from None
    if jobs is None or links is None or uniques is None:
        raise _first_bad_item(data, problem)
    return PairBlock(count, jobs, uniques, links)


def _packed_uuids(joined: str, count: int) -> bytes | None:
    """The 16-byte forms of `joined`, `count` 36-character UUIDs (either case) separated by
    newlines; None unless it is exactly that.

    Sound because: the length fixes 37 characters per value, so the positions checked for
    hyphens and newlines are exactly where each value has them; every other position must
    then be a hex digit, and it is because `unhexlify` accepts only hex digits, in the
    32 * count bytes left once every hyphen and newline is deleted (a stray hyphen or
    newline elsewhere, or a non-ASCII character, changes that count or leaves a byte that
    is not a hex digit).
    """
    stride = _UUID_LEN + 1
    if len(joined) != stride * count - 1:
        return None
    if any(joined[position::stride] != "-" * count for position in _HYPHENS):
        return None
    if joined[_UUID_LEN::stride] != "\n" * (count - 1):
        return None
    digits = joined.encode().translate(None, b"-\n")
    if len(digits) != 2 * UUID_BYTES * count:
        return None
    try:
        return binascii.unhexlify(digits)
    except binascii.Error:
        return None


def _first_bad_item(data: list[object], problem: _ProblemFactory) -> errors.PageProblem:
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            return problem(f"data[{index}]", f"not an object: {_preview(item)}")
        for key in (*_REQUIRED, "uniqueJobUid"):
            value = item.get(key)
            if value is None:
                if key in _REQUIRED:
                    return problem(_field(index, key), "missing (required)")
                continue
            if not isinstance(value, str):
                return problem(_field(index, key), f"not a string: {_preview(value)}")
            if _UUID_RE.fullmatch(value.lower()) is None:
                return problem(_field(index, key), f"not a UUID: {_preview(value)}")
    # Unreachable while _packed_uuids and this walk agree; kept so a bug cannot pass bad data.
    return problem("data", "items failed validation")


def _records(data: list[object], collection: Collection, problem: _ProblemFactory) -> list[Record]:
    """Records of `data`: the identity and the fields `collection` keeps, checked by type.

    Fields the spec does not name are dropped here (organizations' contact data never
    goes further); text is cleaned of control characters and capped.
    """
    (identity,) = collection.identity
    records = []
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise problem(f"data[{index}]", f"not an object: {_preview(item)}")
        uid = _value(item, identity.source, FieldType.UUID, index, problem)
        if uid is None:
            raise problem(_field(index, identity.source), "missing (required)")
        attributes = _values(item, collection.descriptive, index, problem)
        volatile = _values(item, collection.volatile, index, problem)
        records.append(Record(str(uid), attributes, volatile))
    return records


def _values(
    item: dict[str, Any],
    fields: tuple[collections.Field, ...],
    index: int,
    problem: _ProblemFactory,
) -> str:
    values = {}
    for spec in fields:
        value = _value(item, spec.source, spec.type, index, problem)
        if value is not None:
            values[spec.source] = value
    return orjson.dumps(values).decode()


def _value(
    item: dict[str, Any], key: str, kind: FieldType, index: int, problem: _ProblemFactory
) -> object:
    """The field's value as stored (None when absent or null); raises a page problem when it
    has the wrong type."""
    value = item.get(key)
    if value is None:
        return None
    if kind is FieldType.BOOL:
        if type(value) is not bool:
            raise problem(_field(index, key), f"not a boolean: {_preview(value)}")
        return value
    if kind is FieldType.INT:
        if type(value) is not int or not -_INT_BOUND <= value < _INT_BOUND:
            raise problem(_field(index, key), f"not a 64-bit integer: {_preview(value)}")
        return value
    if not isinstance(value, str):
        raise problem(_field(index, key), f"not a string: {_preview(value)}")
    if kind is FieldType.UUID:
        lowered = value.lower()
        if _UUID_RE.fullmatch(lowered) is None:
            raise problem(_field(index, key), f"not a UUID: {_preview(value)}")
        return lowered
    if kind is FieldType.TIMESTAMP:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise problem(
                _field(index, key), f"not an ISO 8601 timestamp: {_preview(value)}"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        try:
            return moment.astimezone(UTC).isoformat()
        except OverflowError:  # .NET's DateTime.MinValue/MaxValue with an offset: "never"
            return None
    return errors.clean_text(value, limit=collections.TEXT_MAX_CHARS)


def _field(index: int, key: str) -> str:
    """Where an item's field is, as a page problem names it (built only for a problem)."""
    return f"data[{index}].{key}"


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _VALUE_PREVIEW else text[: _VALUE_PREVIEW - 3] + "..."
