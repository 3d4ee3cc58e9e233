"""A collection request's query (`limit`, `offset`, `sort`, `filter`, `select`) as VSPC
reads it.

The JSON-valued parameters are URL-encoded arrays, as in `vspc-api-notes.md`; the simulator
knows the three properties of a linked job object, the main ones of catalog items, and the
filter operations syncd might send.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

DEFAULT_LIMIT = 100
MAX_OFFSET = 2_147_483_647
PROPERTIES = ("jobUid", "linkedJobUid", "uniqueJobUid")
CATALOG_PROPERTIES = (
    "instanceUid",
    "uniqueUid",
    "name",
    "type",
    "alias",
    "version",
    "backupServerUid",
    "organizationUid",
    "mappedOrganizationUid",
    "isEnabled",
    "status",
)


@dataclass(frozen=True)
class PageQuery:
    """A jobObjects request's paging, sorting, filtering and selection, as parsed.

    `filter_key` identifies the filter (for caches); `predicate` applies it, None for none.
    """

    offset: int
    limit: int
    sort: tuple[tuple[str, bool], ...]  # (property, descending)
    filter_key: bytes
    predicate: Callable[[dict[str, str]], bool] | None
    select: tuple[str, ...]


class BadQuery(ValueError):
    """A query parameter VSPC would refuse with 400."""


def _int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise BadQuery(f"'{name}' must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadQuery(f"'{name}' must be within {low}..{high}, got {value}")
    return value


def _json_param(query: Mapping[str, str], name: str) -> list[Any]:
    raw = query.get(name)
    if raw is None or not raw.strip():
        return []
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadQuery(f"'{name}' is not valid JSON") from None
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise BadQuery(f"'{name}' must be a JSON array of objects")
    return value


def _property(
    entry: Mapping[str, Any], key: str, what: str, properties: tuple[str, ...] = PROPERTIES
) -> str:
    name = entry.get(key)
    if name not in properties:
        raise BadQuery(f"{what}: unknown property {name!r}")
    assert isinstance(name, str)
    return name


def _predicate(
    expression: Mapping[str, Any], properties: tuple[str, ...]
) -> Callable[[dict[str, Any]], bool]:
    operation = expression.get("operation")
    if operation in ("and", "or", "not"):
        inner_raw = expression.get("items")
        if not isinstance(inner_raw, list) or not inner_raw:
            raise BadQuery(f"filter: '{operation}' needs items")
        inner = [_predicate(item, properties) for item in inner_raw if isinstance(item, dict)]
        if operation == "and":
            return lambda item: all(check(item) for check in inner)
        if operation == "or":
            return lambda item: any(check(item) for check in inner)
        return lambda item: not inner[0](item)
    name = _property(expression, "property", "filter", properties)
    value = expression.get("value")
    if operation == "equals":
        return lambda item: item.get(name) == value
    if operation == "notEquals":
        return lambda item: item.get(name) != value
    if operation == "in" and isinstance(value, list):
        values = frozenset(value)
        return lambda item: item.get(name) in values
    raise BadQuery(f"filter: operation {operation!r} is not supported by the simulator")


def sort_key(name: str) -> Callable[[dict[str, Any]], str]:
    """A key sorting items by property `name`; items without it sort first."""

    def key(item: dict[str, Any]) -> str:
        value = item.get(name, "")
        return value if isinstance(value, str) else str(value)

    return key


def parse(
    query: Mapping[str, str], max_page_size: int, properties: tuple[str, ...] = PROPERTIES
) -> PageQuery:
    """The query parameters of a collection request whose items have `properties`;
    `BadQuery` if VSPC would refuse them."""
    limit = _int_param(query, "limit", DEFAULT_LIMIT, 1, max_page_size)
    offset = _int_param(query, "offset", 0, 0, MAX_OFFSET)
    sort = []
    for entry in _json_param(query, "sort"):
        name = _property(entry, "property", "sort", properties)
        direction = entry.get("direction", "ascending")
        if direction not in ("ascending", "descending"):
            raise BadQuery(f"sort: unknown direction {direction!r}")
        sort.append((name, direction == "descending"))
    filters = _json_param(query, "filter")
    predicate = _predicate({"operation": "and", "items": filters}, properties) if filters else None
    select = tuple(
        _property(entry, "propertyPath", "select", properties)
        for entry in _json_param(query, "select")
    )
    return PageQuery(
        offset=offset,
        limit=limit,
        sort=tuple(sort),
        filter_key=orjson.dumps(filters, option=orjson.OPT_SORT_KEYS),
        predicate=predicate,
        select=select,
    )
