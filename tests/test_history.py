"""The status page's run history: bucketing (pure), the two queries against a real database,
that their plans stay bounded (index scans, no sort of a tenant's whole history), and that a
page view's statements do not grow with the tenants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import errors, history, store

NOW = datetime(2026, 11, 30, 14, 25, 7, tzinfo=UTC)


def test_window_ends_with_the_current_hour() -> None:
    assert history.window_start(NOW) == datetime(2026, 11, 29, 15, 0, tzinfo=UTC)
    assert history.window_start(NOW, hours=1) == datetime(2026, 11, 30, 14, 0, tzinfo=UTC)


def test_fill_hours_gives_every_hour_and_combines_statuses() -> None:
    current = int(NOW.timestamp() // 3600)
    rows = [
        # hour, status, runs, added, removed, mean duration, longest duration
        (current, "succeeded", 3, 10, 2, 2.0, 3.0),
        (current, "failed", 1, 0, 0, 6.0, 6.0),
        (current, "running", 1, 0, 0, None, None),
        (current - 23, "partial", 2, 5, 0, 1.0, 1.5),
        (current - 24, "succeeded", 9, 9, 9, 9.0, 9.0),  # outside: ignored
    ]
    hours = history.fill_hours(rows, NOW)
    assert len(hours) == 24
    assert hours[0].start == datetime(2026, 11, 29, 15, tzinfo=UTC)
    assert hours[-1].start == datetime(2026, 11, 30, 14, tzinfo=UTC)
    last = hours[-1]
    assert last.runs == {"succeeded": 3, "failed": 1, "running": 1}
    assert (last.pairs_added, last.pairs_removed) == (10, 2)
    assert last.duration_avg_s == pytest.approx((3 * 2.0 + 6.0) / 4)
    assert last.duration_max_s == 6.0
    assert hours[0].runs == {"partial": 2}
    empty = hours[10]
    assert (empty.runs, empty.duration_avg_s, empty.duration_max_s) == ({}, None, None)


async def _add_tenant(engine: AsyncEngine, name: str) -> int:
    async with engine.begin() as connection:
        tenant_id = await connection.scalar(
            sa.text("INSERT INTO syncd.tenants (name) VALUES (:name) RETURNING id"),
            {"name": name},
        )
    return int(tenant_id)


async def _add_runs(engine: AsyncEngine, tenant_id: int, runs: list[dict[str, object]]) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            sa.text(
                "INSERT INTO syncd.runs (tenant_id, started_at, finished_at, status, "
                "pairs_added, pairs_removed, error) VALUES (:tenant_id, :started_at, "
                ":finished_at, :status, :added, :removed, :error)"
            ),
            [{"tenant_id": tenant_id, "error": None, "added": 0, "removed": 0} | r for r in runs],
        )
        # Written past `store`, as an import would: the rollup is recomputed, as after one.
        await store.rebuild_run_hours(connection)


def _run(
    ago: timedelta, status: str, duration_s: float | None, **more: object
) -> dict[str, object]:
    started = NOW - ago
    finished = None if duration_s is None else started + timedelta(seconds=duration_s)
    return {"started_at": started, "finished_at": finished, "status": status, **more}


async def test_read_history_of_the_configured_tenants(engine: AsyncEngine) -> None:
    acme = await _add_tenant(engine, "acme")
    globex = await _add_tenant(engine, "<globex> & co")
    gone = await _add_tenant(engine, "no-longer-configured")
    await _add_runs(
        engine,
        acme,
        [_run(timedelta(hours=30), "succeeded", 1.0, added=100)]  # before the window
        + [_run(timedelta(minutes=50 - i), "succeeded", 2.0, added=i) for i in range(25)]
        + [_run(timedelta(minutes=1), "running", None)],
    )
    await _add_runs(
        engine,
        globex,
        [
            _run(timedelta(hours=5, minutes=1), "failed", 4.0, error="HTTP 403"),
            _run(timedelta(hours=5), "partial", 8.0, added=3, removed=7),
        ],
    )
    await _add_runs(engine, gone, [_run(timedelta(minutes=5), "failed", 1.0)])

    found = await history.read_history(
        engine, ["acme", "<globex> & co", "never-synced"], now=NOW, recent_runs=10
    )

    assert len(found.hours) == 24
    totals: dict[str, int] = {}
    for hour in found.hours:
        for status, count in hour.runs.items():
            totals[status] = totals.get(status, 0) + count
    # 25 + 1 running of acme, 2 of globex; nothing from before the window or other tenants.
    assert totals == {"succeeded": 25, "running": 1, "failed": 1, "partial": 1}
    assert sum(hour.pairs_added for hour in found.hours) == sum(range(25)) + 3
    assert sum(hour.pairs_removed for hour in found.hours) == 7
    assert max(h.duration_max_s or 0 for h in found.hours) == pytest.approx(8.0)

    assert set(found.recent) == {"acme", "<globex> & co"}
    acme = found.recent["acme"]
    assert len(acme) == 10
    # Oldest first: the 10 newest are the runs that added 16..24 pairs, then the running one.
    assert acme.pairs_added == (16, 17, 18, 19, 20, 21, 22, 23, 24, 0)
    assert acme.first_started_at == NOW - timedelta(minutes=34)  # the run that added 16
    assert acme.last_started_at == NOW - timedelta(minutes=1)
    assert acme.statuses[-1] == "running" and acme.durations_s[-1] is None
    assert acme.durations_s[0] == pytest.approx(2.0)
    globex = found.recent["<globex> & co"]
    assert (globex.statuses, globex.pairs_added, globex.pairs_removed) == (
        ("failed", "partial"),
        (0, 3),
        (0, 7),
    )
    assert globex.durations_s[1] == pytest.approx(8.0)

    # The last runs only of the tenants asked for; the 24 hours of all of them.
    some = await history.read_history(
        engine, ["acme", "<globex> & co"], recent_of=["<globex> & co"], now=NOW
    )
    assert set(some.recent) == {"<globex> & co"} and some.hours == found.hours


async def test_read_history_of_no_tenants_is_empty(engine: AsyncEngine) -> None:
    found = await history.read_history(engine, [], now=NOW)
    assert len(found.hours) == 24 and not any(hour.runs for hour in found.hours)
    assert found.recent == {}


async def test_read_history_on_a_missing_schema_is_a_database_error(
    empty_db_url: str,
) -> None:
    from syncd import db

    async with db.open_engine(empty_db_url, pool_size=1) as engine:
        with pytest.raises(errors.DatabaseError, match="cannot read the run history"):
            await history.read_history(engine, ["acme"], now=NOW)


async def _plan(engine: AsyncEngine, query: sa.TextClause, params: dict[str, object]) -> str:
    async with engine.begin() as connection:
        # Tiny test tables would be scanned whole whatever the indexes; forbid that, so the
        # plan shows whether an index *can* serve the query's shape.
        await connection.execute(sa.text("SET LOCAL enable_seqscan = off"))
        await connection.execute(sa.text("SET LOCAL enable_bitmapscan = off"))
        rows = await connection.execute(sa.text("EXPLAIN " + query.text), params)
        return "\n".join(row[0] for row in rows)


async def test_queries_are_served_by_indexes(engine: AsyncEngine) -> None:
    tenant_id = await _add_tenant(engine, "acme")
    await _add_runs(
        engine, tenant_id, [_run(timedelta(hours=h), "succeeded", 1.0) for h in range(50)]
    )
    async with engine.begin() as connection:
        await connection.execute(sa.text("ANALYZE syncd.runs"))
        await connection.execute(sa.text("ANALYZE syncd.run_hours"))
        await connection.execute(sa.text("ANALYZE syncd.tenants"))

    last_day = await _plan(
        engine,
        history._LAST_DAY,
        {"since": history.window_start(NOW), "tenants": ["acme"]},
    )
    # The rollup by hour, and the runs still going through the partial index of those alone.
    assert "pk_run_hours" in last_day, last_day
    assert "using ix_runs_tenant_id on runs" in last_day, last_day

    recent = await _plan(engine, history._RECENT, {"tenants": ["acme"], "limit": 20})
    # Each tenant's LIMIT reads the index backwards: no sort of the tenant's history (the
    # only sort is of the N rows per tenant that come out).
    lines = recent.splitlines()
    limit = next(index for index, line in enumerate(lines) if "Limit" in line)
    assert "Index Scan Backward using ix_runs_tenant_id_id" in lines[limit + 1], recent


async def _statements_of_a_page_view(engine: AsyncEngine, tenants: int) -> int:
    """Statements `read_history` sends for `tenants` tenants, each with runs in the window
    and beyond, one of them running."""
    names = [f"tenant-{count:03d}-of-{tenants}" for count in range(tenants)]
    for name in names:
        tenant_id = await _add_tenant(engine, name)
        await _add_runs(
            engine,
            tenant_id,
            [_run(timedelta(minutes=15 * i), "succeeded", 1.0) for i in range(1, 30)]
            + [_run(timedelta(seconds=5), "running", None)],
        )
    sent: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        sent.append(statement)

    sa.event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        found = await history.read_history(engine, names, now=NOW)
    finally:
        sa.event.remove(engine.sync_engine, "before_cursor_execute", count)
    assert len(found.recent) == tenants and sum(h.runs.get("running", 0) for h in found.hours)
    return len(sent)


async def test_a_page_view_sends_as_many_statements_for_40_tenants_as_for_2(
    engine: AsyncEngine,
) -> None:
    few = await _statements_of_a_page_view(engine, 2)
    many = await _statements_of_a_page_view(engine, 40)
    # The statement timeout, the 24 hours, the last runs: whatever the tenant count.
    assert few == many == 3
