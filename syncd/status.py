"""Run and tenant statuses: `RunStatus`, the one list of how a run stands or ended, and
`TenantStatus`, the one model behind `syncd status`, `/status` and the gauges.

`syncd status` fills it from the database (`store.read_tenant_status`); the daemon fills
the same type from what its scheduler knows (its own runs, and every replica's as read from
the database), adding what only a running daemon can tell (schedule, running, queued, next
look). Both speak one JSON form, `TenantStatus.as_json`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


class RunStatus(enum.StrEnum):
    """How a tenant's run stands or ended: the one list of run statuses.

    `skipped` is never stored: another process held the tenant, so no run row exists.
    """

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    SKIPPED = "skipped"


def iso(moment: datetime | None) -> str | None:
    """`moment` in ISO 8601, UTC (None stays None)."""
    return None if moment is None else moment.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class TenantStatus:
    """Where one tenant stands: its last run, last success and pairs, and (in the daemon)
    its schedule. `configured` is False for a tenant the database holds that the config
    no longer names (its data stays)."""

    tenant: str
    configured: bool = True
    last_run_at: datetime | None = None
    last_status: RunStatus | None = None
    last_success_at: datetime | None = None
    pairs: int | None = None
    age_s: float | None = None  # since the last success, when this was read
    # The last run's outcome per collection, by name ({"status", "pages", "seen", "added",
    # "removed", "changed", "error"}), as `sync_runs.collections` holds it.
    collections: Mapping[str, Mapping[str, Any]] | None = None
    # What only a running daemon knows; defaults elsewhere.
    schedule: str | None = None
    period_s: float | None = None  # the schedule's period: "stale" is measured in it
    running_since: datetime | None = None
    queued_since: datetime | None = None
    waiting_for: str | None = None
    last_finished_at: datetime | None = None
    last_error: str | None = None
    last_run_id: int | None = None
    last_duration_s: float | None = None
    next_run_at: datetime | None = None
    consecutive_failures: int = 0
    # Replicas: who ran the last run; when the tenant is next due, and who holds it now
    # (from the database: any replica's runs and claims).
    last_replica: str | None = None
    due_at: datetime | None = None
    claimed_by: str | None = None

    def unavailable_collections(self) -> list[str]:
        """Collections the server did not have in the last run (HTTP 404), by name."""
        return [
            name
            for name, outcome in (self.collections or {}).items()
            if outcome.get("status") == "unavailable"
        ]

    @property
    def ok(self) -> bool:
        """Last run succeeded (or one is running after an earlier success)."""
        return self.last_success_at is not None and self.last_status in (
            RunStatus.SUCCEEDED,
            RunStatus.RUNNING,
        )

    def as_json(self) -> dict[str, Any]:
        """The JSON form of `syncd status --json` and `/status` (timestamps ISO 8601, UTC)."""
        return {
            "tenant": self.tenant,
            "configured": self.configured,
            "last_run_at": iso(self.last_run_at),
            "last_status": None if self.last_status is None else str(self.last_status),
            "last_success_at": iso(self.last_success_at),
            "age_s": None if self.age_s is None else round(self.age_s, 3),
            "pairs": self.pairs,
            "collections": None if self.collections is None else dict(self.collections),
            "ok": self.ok,
            "schedule": self.schedule,
            "period_s": self.period_s,
            "running": self.running_since is not None,
            "running_since": iso(self.running_since),
            "queued": self.queued_since is not None,
            "waiting_for": self.waiting_for,
            "last_finished_at": iso(self.last_finished_at),
            "last_error": self.last_error,
            "last_run_id": self.last_run_id,
            "last_duration_s": self.last_duration_s,
            "next_run_at": iso(self.next_run_at),
            "consecutive_failures": self.consecutive_failures,
            "last_replica": self.last_replica,
            "due_at": iso(self.due_at),
            "claimed_by": self.claimed_by,
        }
