"""What `/metrics` exposes: no `*_created` series, help texts that name their unit.

Scraped from the real endpoint (web.create_app on a real socket), after every metric has
been recorded at least once, so each family has samples to show.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from syncd import metrics, web
from syncd.sync import SyncResult
from tests.webapp import StaticView, served

# Every help text names one of these (Prometheus' base units, or what is being counted).
UNITS = (
    "seconds",
    "(runs)",
    "(pairs)",
    "(requests)",
    "(reloads)",
    "(checks)",
    "(items)",
    "(boolean)",
)


def exercised() -> metrics.Metrics:
    """A registry in which every metric has at least one series."""
    registry = metrics.Metrics()
    registry.tenant_scheduled("acme", 900.0)
    registry.request_done("acme", "200")
    registry.retry_scheduled("acme", "429")
    registry.record_run(
        SyncResult(
            tenant="acme",
            status="succeeded",
            run_id=7,
            added=3,
            removed=1,
            duration_s=1.5,
            current_pairs=42,
        ),
        consecutive_failures=0,
    )
    registry.runs_in_progress.set(0)
    registry.config_reloads.labels(result="applied").inc()
    return registry


@contextlib.asynccontextmanager
async def scrape_app(registry: metrics.Metrics) -> AsyncIterator[str]:
    """The text of one GET /metrics from a real server around `registry`."""
    async with (
        served(StaticView(), registry) as (session, base_url),
        session.get(base_url + web.METRICS) as response,
    ):
        assert response.status == 200
        yield await response.text()


async def test_metrics_have_no_created_series() -> None:
    async with scrape_app(exercised()) as text:
        names = {
            sample.name
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
    # The counters and the histogram are there, only without their _created twins.
    assert {
        "syncd_sync_runs_total",
        "syncd_pairs_changed_total",
        "syncd_sync_duration_seconds_count",
        "syncd_http_requests_total",
    } <= names
    assert "_created" not in text
    assert not [name for name in names if name.endswith("_created")]


def test_leaving_out_created_series_is_local_to_syncds_registry() -> None:
    # The filter must not switch prometheus_client's process-wide setting off.
    other = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("other_things", "Things (things).", registry=other).inc()
    assert b"other_things_created" in prometheus_client.generate_latest(other)


def test_every_help_text_names_its_unit() -> None:
    families = list(exercised().registry.collect())
    assert len(families) >= 12
    unitless = [
        (family.name, family.documentation)
        for family in families
        if not any(unit in family.documentation for unit in UNITS)
    ]
    assert not unitless


def test_schedule_period_is_exported_per_tenant() -> None:
    registry = exercised()
    text = registry.render().decode()
    assert 'syncd_schedule_period_seconds{tenant="acme"} 900.0' in text
    registry.forget_tenant("acme")
    assert "syncd_schedule_period_seconds{" not in registry.render().decode()
