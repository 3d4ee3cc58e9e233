"""Run history for the status page's charts: two bounded queries per page view.

- The last 24 hours, all configured tenants together, by hour and status: the hourly
  rollup `run_hours` (a row per hour, tenant and status, kept by the statements that end
  runs), plus the runs still going, found through the partial index of running runs. At
  1,000 tenants that is ~25,000 small rows, however long the history kept.
- The last N runs of each tenant the page draws them for: one LATERAL ... LIMIT N per
  tenant on the index `(tenant_id, id)`, so N x tenants rows, never a tenant's whole history.

Reads only; the sync's own SQL lives in `store`. The hourly rows are turned into a full
24-hour series by a pure function, `fill_hours`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import errors

WINDOW_HOURS = 24
RECENT_RUNS = 20
# A page view must stay cheap: the server gives up on a slower statement (the daemon's page
# then shows its rows without charts).
STATEMENT_TIMEOUT_MS = 2000

HOUR_S = 3600

# Hours are counted from the Unix epoch so bucketing does not depend on the session's time
# zone; the page labels them in UTC. Rollup hours are whole hours since the epoch already:
# grouped as they are, turned into numbers once per group. date_part (float8) rather than
# extract (numeric) for the few running runs.
_LAST_DAY = sa.text(
    """
    SELECT (date_part('epoch', hour) / 3600)::bigint AS hour,
           status, runs, pairs_added, pairs_removed, duration_avg_s, duration_max_s
      FROM (SELECT h.hour,
                   h.status,
                   sum(h.runs)::bigint AS runs,
                   sum(h.pairs_added)::bigint AS pairs_added,
                   sum(h.pairs_removed)::bigint AS pairs_removed,
                   sum(h.duration_sum_s) / nullif(sum(h.runs_timed), 0) AS duration_avg_s,
                   max(h.duration_max_s) AS duration_max_s
              FROM syncd.run_hours h
              JOIN syncd.tenants t ON t.id = h.tenant_id
             WHERE h.hour >= :since AND t.name = ANY(:tenants)
             GROUP BY h.hour, h.status) finished
     UNION ALL
    SELECT floor(date_part('epoch', r.started_at) / 3600)::bigint,
           r.status,
           count(*),
           coalesce(sum(r.pairs_added), 0)::bigint,
           coalesce(sum(r.pairs_removed), 0)::bigint,
           NULL,
           NULL
      FROM syncd.runs r
      JOIN syncd.tenants t ON t.id = r.tenant_id
     WHERE r.status = 'running' AND r.started_at >= :since AND t.name = ANY(:tenants)
     GROUP BY 1, 2
    """
)

# The base tables, not the view: through the view's join the planner cannot see that the
# index (tenant_id, id) already yields a tenant's runs in id order, and sorts all of them.
# One row per tenant, its runs in arrays: a tenth of the rows to send and decode.
_RECENT = sa.text(
    """
    SELECT t.name,
           array_agg(r.status ORDER BY r.id) AS statuses,
           min(r.started_at) AS first_started_at,
           max(r.started_at) AS last_started_at,
           array_agg(date_part('epoch', r.finished_at - r.started_at) ORDER BY r.id)
               AS durations_s,
           array_agg(r.pairs_added ORDER BY r.id) AS pairs_added,
           array_agg(r.pairs_removed ORDER BY r.id) AS pairs_removed
      FROM syncd.tenants t
     CROSS JOIN LATERAL (
           SELECT id, status, started_at, finished_at, pairs_added, pairs_removed
             FROM syncd.runs
            WHERE tenant_id = t.id
            ORDER BY id DESC
            LIMIT :limit
           ) r
     WHERE t.name = ANY(:tenants)
     GROUP BY t.id, t.name
    """
)


@dataclass(frozen=True)
class HourStats:
    """The runs of every configured tenant that started in one hour."""

    start: datetime
    runs: Mapping[str, int] = field(default_factory=dict)  # by status
    pairs_added: int = 0
    pairs_removed: int = 0
    duration_avg_s: float | None = None
    duration_max_s: float | None = None


@dataclass(frozen=True)
class RecentRuns:
    """A tenant's last runs, oldest first, a tuple per column (as the charts draw them), and
    when the first and the last of them started. A run still going has a duration of None."""

    statuses: tuple[str, ...]
    durations_s: tuple[float | None, ...]
    pairs_added: tuple[int, ...]
    pairs_removed: tuple[int, ...]
    first_started_at: datetime
    last_started_at: datetime

    def __len__(self) -> int:
        return len(self.statuses)


@dataclass(frozen=True)
class History:
    """What the charts draw: `hours` oldest first (every hour present), `recent` by tenant,
    each tenant's runs oldest first."""

    hours: tuple[HourStats, ...]
    recent: Mapping[str, RecentRuns]


def window_start(now: datetime, hours: int = WINDOW_HOURS) -> datetime:
    """Start of the oldest hour shown: the window ends with the hour `now` is in."""
    current = int(now.timestamp() // HOUR_S)
    return datetime.fromtimestamp((current - hours + 1) * HOUR_S, UTC)


def fill_hours(
    rows: Sequence[Sequence[Any]], now: datetime, hours: int = WINDOW_HOURS
) -> tuple[HourStats, ...]:
    """Every hour of the window, from rows of (hour number, status, runs, added, removed,
    average and longest duration); hours without runs are empty."""
    first = int(window_start(now, hours).timestamp() // HOUR_S)
    by_hour: dict[int, list[Sequence[Any]]] = {}
    for row in rows:
        by_hour.setdefault(int(row[0]), []).append(row)
    filled = []
    for hour in range(first, first + hours):
        found = by_hour.get(hour, [])
        runs = {str(row[1]): int(row[2]) for row in found}
        timed = [(row[5], row[6], int(row[2])) for row in found if row[5] is not None]
        finished = sum(count for _, _, count in timed)
        filled.append(
            HourStats(
                start=datetime.fromtimestamp(hour * HOUR_S, UTC),
                runs=runs,
                pairs_added=sum(int(row[3]) for row in found),
                pairs_removed=sum(int(row[4]) for row in found),
                # The mean over all finished runs of the hour, from the per-status means.
                duration_avg_s=(
                    sum(float(avg) * count for avg, _, count in timed) / finished
                    if finished
                    else None
                ),
                duration_max_s=max((float(longest) for _, longest, _ in timed), default=None),
            )
        )
    return tuple(filled)


async def read_history(
    engine: AsyncEngine,
    tenants: Sequence[str],
    *,
    recent_of: Sequence[str] | None = None,
    now: datetime | None = None,
    recent_runs: int = RECENT_RUNS,
    hours: int = WINDOW_HOURS,
) -> History:
    """The charts' data for `tenants`, their last runs only for `recent_of` (by default all
    of them); `errors.DatabaseError` when it cannot be read."""
    now = now or datetime.now(UTC)
    names = list(dict.fromkeys(tenants))
    recent_names = names if recent_of is None else list(dict.fromkeys(recent_of))
    try:
        async with engine.begin() as connection:
            await connection.execute(
                sa.text(f"SET LOCAL statement_timeout = {int(STATEMENT_TIMEOUT_MS)}")
            )
            hourly = (
                await connection.execute(
                    _LAST_DAY, {"since": window_start(now, hours), "tenants": names}
                )
            ).all()
            recent_rows = (
                await connection.execute(_RECENT, {"tenants": recent_names, "limit": recent_runs})
            ).all()
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        raise errors.DatabaseError(f"cannot read the run history: {exc}") from exc
    recent = {
        row[0]: RecentRuns(
            statuses=tuple(row[1]),
            durations_s=tuple(row[4]),
            pairs_added=tuple(row[5]),
            pairs_removed=tuple(row[6]),
            first_started_at=row[2],
            last_started_at=row[3],
        )
        for row in recent_rows
    }
    return History(hours=fill_hours(hourly, now, hours), recent=recent)
