"""The daemon's Prometheus metrics, on a registry of its own (never the global default one).

`Metrics` is also the `vspc.RequestObserver` the daemon hands to every client, so HTTP
request and retry counts land here without the client knowing about Prometheus.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from syncd.sync import SyncResult

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# Runs take from well under a second (a small tenant) to many minutes (millions of pairs).
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _WithoutCreated:
    """A collector yielding `registry`'s metrics minus their `*_created` samples.

    prometheus_client adds a `_created` series (the child's creation time) to every counter
    and histogram child: it doubles the series count and no dashboard or alert reads it. Its
    own switch, `disable_created_metrics()`, is process-wide; filtering here keeps the choice
    to this registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            created = family.name + "_created"
            family.samples = [sample for sample in family.samples if sample.name != created]
            yield family


class Metrics:
    """Every metric `syncd run` exposes on `/metrics`. Help texts say the unit."""

    def __init__(self, scrub: Callable[[str], str] = str) -> None:
        # Tenant names become label values: scrubbed of known secrets like every other sink.
        self._scrub = scrub
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.sync_runs = Counter(
            "syncd_sync_runs",
            "Runs of a tenant's sync (runs), by how they ended.",
            ["tenant", "status"],
            registry=registry,
        )
        self.sync_duration = Histogram(
            "syncd_sync_duration_seconds",
            "Wall-clock time of a tenant's run, in seconds.",
            ["tenant"],
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )
        self.pairs_current = Gauge(
            "syncd_pairs_current",
            "Pairs currently stored for the tenant (pairs), after its last applied run.",
            ["tenant"],
            registry=registry,
        )
        self.pairs_changed = Counter(
            "syncd_pairs_changed",
            "Pairs added or removed by the tenant's runs (pairs).",
            ["tenant", "change"],
            registry=registry,
        )
        self.items_current = Gauge(
            "syncd_items_current",
            "Items (pairs or catalog items) of a collection stored for the tenant, after its "
            "last run that applied it (items).",
            ["tenant", "collection"],
            registry=registry,
        )
        self.items_changed = Counter(
            "syncd_items_changed",
            "Items of a collection added, removed or changed (a new version) by runs (items).",
            ["tenant", "collection", "change"],
            registry=registry,
        )
        self.collection_runs = Counter(
            "syncd_collection_runs",
            "Collections synced in a tenant's runs (runs), by how each ended "
            "(unavailable: HTTP 404).",
            ["tenant", "collection", "status"],
            registry=registry,
        )
        self.last_success = Gauge(
            "syncd_last_success_timestamp_seconds",
            "Unix time, in seconds, at which the tenant's last succeeded run finished.",
            ["tenant"],
            registry=registry,
        )
        self.consecutive_failures = Gauge(
            "syncd_consecutive_failures",
            "Failed runs of the tenant (runs) since its last run that did not fail.",
            ["tenant"],
            registry=registry,
        )
        self.http_requests = Counter(
            "syncd_http_requests",
            "Requests sent to VSPC (requests), by HTTP status or transport failure.",
            ["tenant", "code"],
            registry=registry,
        )
        self.http_retries = Counter(
            "syncd_http_retries",
            "Requests to VSPC that will be sent again (requests), by reason.",
            ["tenant", "reason"],
            registry=registry,
        )
        self.runs_in_progress = Gauge(
            "syncd_runs_in_progress",
            "Tenant runs in progress right now (runs).",
            registry=registry,
        )
        self.ready = Gauge(
            "syncd_ready",
            "1 when the daemon is ready (database reachable, schema at head, scheduler up), "
            "else 0 (boolean).",
            registry=registry,
        )
        self.database_checks = Counter(
            "syncd_database_checks",
            "Checks of the database and its schema for readiness (checks), by result.",
            ["result"],
            registry=registry,
        )
        self.claims = Counter(
            "syncd_claims",
            "Looks at a tenant's due time and claim (checks), by result: won (this replica "
            "runs it), not_due, taken (another process holds it), error (the database failed).",
            ["result"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "syncd_config_reloads",
            "Configuration reloads on SIGHUP (reloads), by result.",
            ["result"],
            registry=registry,
        )
        self.schedule_period = Gauge(
            "syncd_schedule_period_seconds",
            "Time between the tenant's scheduled runs, in seconds (cron schedules: between "
            "the next two fire times); stale: last success older than 3 periods.",
            ["tenant"],
            registry=registry,
        )

    def _label(self, tenant: str) -> str:
        return self._scrub(tenant)

    # vspc.RequestObserver
    def request_done(self, tenant: str, code: str) -> None:
        """Counts a request to VSPC that ended with `code`."""
        self.http_requests.labels(tenant=self._label(tenant), code=code).inc()

    def retry_scheduled(self, tenant: str, reason: str) -> None:
        """Counts a retry of a request to VSPC."""
        self.http_retries.labels(tenant=self._label(tenant), reason=reason).inc()

    def record_run(self, result: SyncResult, consecutive_failures: int) -> None:
        """Records the outcome of one run of `result.tenant`."""
        tenant = result.tenant
        self.sync_runs.labels(tenant=self._label(tenant), status=result.status).inc()
        self.consecutive_failures.labels(tenant=self._label(tenant)).set(consecutive_failures)
        if result.run_id is None:
            return  # skipped as busy, or the database failed before the run began
        self.sync_duration.labels(tenant=self._label(tenant)).observe(result.duration_s)
        self.pairs_changed.labels(tenant=self._label(tenant), change="added").inc(result.added)
        self.pairs_changed.labels(tenant=self._label(tenant), change="removed").inc(result.removed)
        if result.current_pairs is not None:
            self.pairs_current.labels(tenant=self._label(tenant)).set(result.current_pairs)
        for collection, outcome in result.collections.items():
            labels = {"tenant": self._label(tenant), "collection": collection}
            self.collection_runs.labels(**labels, status=str(outcome.status)).inc()
            for change, count in (
                ("added", outcome.added),
                ("removed", outcome.removed),
                ("changed", outcome.changed),
            ):
                self.items_changed.labels(**labels, change=change).inc(count)
            if outcome.current is not None:
                self.items_current.labels(**labels).set(outcome.current)
        if result.status == "succeeded":
            self.last_success.labels(tenant=self._label(tenant)).set(time.time())

    def tenant_scheduled(self, tenant: str, period_s: float) -> None:
        """Records the period of a tenant's (re)scheduled runs."""
        self.schedule_period.labels(tenant=tenant).set(period_s)

    def seed_tenant(
        self,
        tenant: str,
        pairs: int,
        last_success_at: datetime | None,
        consecutive_failures: int = 0,
    ) -> None:
        """Sets the gauges of a tenant from what the database holds (another replica's runs,
        or runs before this process started)."""
        self.pairs_current.labels(tenant=self._label(tenant)).set(pairs)
        self.consecutive_failures.labels(tenant=self._label(tenant)).set(consecutive_failures)
        if last_success_at is not None:
            self.last_success.labels(tenant=self._label(tenant)).set(last_success_at.timestamp())

    def forget_tenant(self, tenant: str) -> None:
        """Drops every series of a tenant that left the configuration."""
        for metric in (
            self.sync_runs,
            self.sync_duration,
            self.pairs_current,
            self.pairs_changed,
            self.items_current,
            self.items_changed,
            self.collection_runs,
            self.last_success,
            self.consecutive_failures,
            self.http_requests,
            self.http_retries,
            self.schedule_period,
        ):
            metric.remove_by_labels({"tenant": self._label(tenant)})

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format, without `*_created` series."""
        return prometheus_client.generate_latest(_WithoutCreated(self.registry))
