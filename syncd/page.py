"""The status page at `/`: one HTML document from the daemon's state and the run history.

`render` is pure: data in, a string out. The document has no scripts and loads nothing (the
endpoint's Content-Security-Policy forbids it; it works on an air-gapped host); a meta
refresh reloads it. Every string from the config, VSPC, the database or the daemon passes
through `_Page.text`: scrubbed of known secrets, then HTML-escaped, so a tenant named `<script>`
shows as text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from syncd import history, svg

REFRESH_S = 5
STALE_PERIODS = 3  # no success for this many periods: the age of the last success turns red
ERROR_PREVIEW_CHARS = 90
X_LABEL_EVERY_H = 6
# Tenants shown in full, with their last runs' charts: those needing attention first. The
# others are listed by name under their status: a row and two charts each would make a page
# of a thousand tenants megabytes to send and a tenth of a second to draw, every few seconds.
DETAILED_TENANTS = 50

# Status colours, shared by badges, chart bars and legends. Dark enough for white text.
COLOURS = {
    "succeeded": "#2e7d32",
    "partial": "#b35c00",
    "failed": "#c62828",
    "running": "#1565c0",
    "queued": "#5e35b1",
    "waiting": "#616161",
    "none": "#757575",
    "added": "#2e7d32",
    "removed": "#c62828",
    "longest": "#90a4ae",
    "mean": "#263238",
}
CHART_STATUSES = ("succeeded", "partial", "failed", "running")

Scrub = Callable[[str], str]


@dataclass(frozen=True)
class PageData:
    """Everything the page shows. `tenants` are the scheduler's status rows; `history` is
    None when the database could not be read, `history_problem` then says why."""

    checks: Mapping[str, str | None]
    tenants: Sequence[Mapping[str, Any]]
    now: datetime
    history: history.History | None = None
    history_problem: str | None = None
    detailed_tenants: int = DETAILED_TENANTS


# --- small pure helpers ------------------------------------------------------------------


def shorten(text: str, limit: int = ERROR_PREVIEW_CHARS) -> str:
    """The first line of `text`, cut to `limit` characters with an ellipsis."""
    whole = text.strip()
    first = whole.splitlines()[0] if whole else ""
    if len(first) > limit:
        return first[: limit - 1].rstrip() + "\u2026"
    return first if first == whole else first + " \u2026"


def duration_text(seconds: float) -> str:
    """An age or a wait as people read it: 8s, 4m 10s, 3h 5m, 2d 4h."""
    total = max(int(seconds), 0)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m {secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def _moment(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value)
    return None


def _utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def is_stale(row: Mapping[str, Any], now: datetime) -> bool:
    """Whether the tenant's last success is older than STALE_PERIODS periods, or it has run
    and never succeeded."""
    last = _moment(row.get("last_success_at"))
    if last is None:
        return row.get("last_status") is not None
    period_s = float(row.get("period_s") or 0.0)
    return period_s > 0 and (now - last).total_seconds() > STALE_PERIODS * period_s


def since_success(row: Mapping[str, Any], now: datetime) -> tuple[str, bool]:
    """(age of the tenant's last success, whether that is stale: see `is_stale`)."""
    last = _moment(row.get("last_success_at"))
    age = "never" if last is None else duration_text((now - last).total_seconds())
    return (age, is_stale(row, now))


def state_of(row: Mapping[str, Any]) -> str:
    """What the tenant is doing or how its last run ended (a key of COLOURS)."""
    if row.get("running"):
        return "running"
    if row.get("queued"):
        return "queued"
    if row.get("waiting_for"):
        return "waiting"
    status = row.get("last_status")
    return status if isinstance(status, str) and status in COLOURS else "none"


def needs_attention(row: Mapping[str, Any], now: datetime) -> bool:
    """A failing or stale tenant: listed first."""
    return row.get("last_status") == "failed" or is_stale(row, now)


def ordered(rows: Sequence[Mapping[str, Any]], now: datetime) -> list[Mapping[str, Any]]:
    """The tenants' rows as the page lists them: problems first; otherwise the
    configuration's order."""
    return sorted(rows, key=lambda row: not needs_attention(row, now))


def detailed(
    rows: Sequence[Mapping[str, Any]], now: datetime, limit: int = DETAILED_TENANTS
) -> list[str]:
    """Names of the tenants the page shows in full (the only ones whose last runs it
    draws): the first `limit` of `ordered`."""
    return [str(row.get("tenant", "")) for row in ordered(rows, now)[:limit]]


def runs_summary(runs: history.RecentRuns) -> str:
    """One line about a tenant's last runs (the tooltip of their chart)."""
    counts: dict[str, int] = {}
    for status in runs.statuses:
        counts[status] = counts.get(status, 0) + 1
    statuses = ", ".join(f"{count} {status}" for status, count in counts.items())
    timed = [duration for duration in runs.durations_s if duration is not None]
    span = f"; {svg.seconds_text(min(timed))} to {svg.seconds_text(max(timed))}" if timed else ""
    first, last = runs.first_started_at.astimezone(UTC), runs.last_started_at.astimezone(UTC)
    return (
        f"Last {len(runs)} runs, {first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M} UTC: "
        f"{statuses}{span}"
    )


# --- rendering ---------------------------------------------------------------------------


def _css() -> str:
    colours = "".join(
        f".fill-{name}{{fill:{colour}}}.bg-{name}{{background:{colour}}}"
        for name, colour in COLOURS.items()
    )
    return (
        "body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;"
        "margin:0;color:#1b1b1b;background:#f5f6f8}"
        "header,main{padding:12px 20px}header{background:#fff;border-bottom:1px solid #ddd}"
        "h1{font-size:20px;margin:0 8px 0 0;display:inline-block}"
        "h2{font-size:16px;margin:18px 0 8px}"
        ".ready{display:inline-block;padding:3px 10px;border-radius:12px;color:#fff;"
        "font-weight:600}.ready.ok{background:#2e7d32}.ready.bad{background:#c62828}"
        ".checks{list-style:none;padding:0;margin:8px 0 0;display:flex;flex-wrap:wrap;gap:8px}"
        ".check{padding:2px 10px;border-radius:4px;border:1px solid}"
        ".check.ok{color:#1b5e20;border-color:#a5d6a7;background:#e8f5e9}"
        ".check.bad{color:#b71c1c;border-color:#ef9a9a;background:#ffebee;font-weight:600}"
        ".meta{color:#555;font-size:12px;margin-top:6px}.meta a{color:#1565c0}"
        ".summary span{margin-right:14px}.summary .bad{color:#c62828;font-weight:600}"
        ".charts{display:flex;flex-wrap:wrap;gap:12px}"
        "figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;"
        "padding:8px;flex:1 1 340px;max-width:520px}"
        "figcaption{font-weight:600;margin-bottom:4px}"
        "svg.chart{display:block;width:100%;height:auto}svg.strip{width:120px;height:26px}"
        ".label{font-size:9px;fill:#555}.empty{font-size:11px;fill:#888}"
        ".axis{stroke:#888;stroke-width:.6}.grid{stroke:#ddd;stroke-width:.6}"
        ".legend{font-size:12px;color:#444;margin-top:4px}"
        ".key{margin-right:10px;white-space:nowrap}.key i{display:inline-block;width:10px;"
        "height:10px;margin-right:4px;border-radius:2px;vertical-align:-1px}"
        ".unavailable{background:#fff3e0;border:1px solid #ffcc80;padding:8px 12px;"
        "border-radius:6px;color:#7a4100}"
        "table{border-collapse:collapse;background:#fff;width:100%;border:1px solid #ddd}"
        "th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eee;"
        "vertical-align:middle}th{background:#fafafa;font-size:12px;color:#555}"
        "td{white-space:nowrap}td.name{white-space:normal;word-break:break-word}"
        "td.num{text-align:right;font-variant-numeric:tabular-nums}"
        ".badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;"
        "font-size:12px;font-weight:600}"
        ".stale{color:#c62828;font-weight:700}.fresh{color:#1b5e20}"
        ".error{color:#b71c1c;max-width:420px;overflow:hidden;text-overflow:ellipsis;"
        "white-space:nowrap}.muted{color:#888}"
        "tr.attention{background:#fff8f8}"
        ".others{list-style:none;padding:0;margin:4px 0}.others li{margin:6px 0;"
        "line-height:1.8}.others .badge{margin-right:4px}" + colours
    )


class _Page:
    """One rendering: holds the scrubber and the clock."""

    def __init__(self, data: PageData, scrub: Scrub) -> None:
        self.data = data
        self.scrub = scrub
        # By the row's identity: the order, the summary and the rows all ask.
        self._stale: dict[int, bool] = {}

    def stale(self, row: Mapping[str, Any]) -> bool:
        """`is_stale`, once per row."""
        found = self._stale.get(id(row))
        if found is None:
            found = self._stale[id(row)] = is_stale(row, self.data.now)
        return found

    def attention(self, row: Mapping[str, Any]) -> bool:
        """`needs_attention`, once per row."""
        return row.get("last_status") == "failed" or self.stale(row)

    def text(self, value: object) -> str:
        """Any value as escaped text, scrubbed of known secrets first."""
        return svg.esc(self.scrub(str(value)))

    # --- header --------------------------------------------------------------------------

    def readiness(self) -> str:
        checks = self.data.checks
        failing = {name: reason for name, reason in checks.items() if reason is not None}
        ready = not failing
        items = "".join(
            f'<li class="check {"bad" if reason else "ok"}" data-check="{self.text(name)}">'
            f"{self.text(name)}: {self.text(reason) if reason else 'ok'}</li>"
            for name, reason in checks.items()
        )
        label = "Ready" if ready else "Not ready"
        return (
            f'<span class="ready {"ok" if ready else "bad"}" data-ready="{str(ready).lower()}">'
            f"{label}</span>"
            f'<ul class="checks">{items}</ul>'
        )

    def summary(self, rows: Sequence[Mapping[str, Any]]) -> str:
        failing = sum(1 for row in rows if row.get("last_status") == "failed")
        stale = sum(1 for row in rows if self.stale(row))
        running = sum(1 for row in rows if row.get("running"))
        parts = [
            f"<span>{len(rows)} tenant{'s' if len(rows) != 1 else ''}</span>",
            f'<span class="{"bad" if failing else ""}">{failing} failing</span>',
            f'<span class="{"bad" if stale else ""}">{stale} stale</span>',
            f"<span>{running} running</span>",
        ]
        return f'<p class="summary" data-summary>{"".join(parts)}</p>'

    # --- 24-hour charts --------------------------------------------------------------------

    @staticmethod
    def legend(names: Sequence[tuple[str, str]]) -> str:
        keys = "".join(
            f'<span class="key"><i class="bg-{css}"></i>{svg.esc(label)}</span>'
            for css, label in names
        )
        return f'<div class="legend">{keys}</div>'

    def charts(self) -> str:
        found = self.data.history
        if found is None:
            problem = self.data.history_problem or "the run history is not available"
            return (
                f'<p class="unavailable" data-charts-unavailable>Charts unavailable: '
                f"{self.text(shorten(problem, 300))}</p>"
            )
        hours = found.hours
        labels = [
            f"{hour.start:%H:00}" if index % X_LABEL_EVERY_H == 0 else ""
            for index, hour in enumerate(hours)
        ]
        tips = [f"{hour.start:%H:00}\u2013{hour.start:%H}:59 UTC" for hour in hours]
        runs = svg.stacked_bars(
            [
                svg.Series(status, status, [float(h.runs.get(status, 0)) for h in hours])
                for status in CHART_STATUSES
            ],
            labels,
            chart_id="runs-by-status",
            title="Runs by status, per hour (last 24 hours)",
            tips=tips,
        )
        pairs = svg.diverging_bars(
            svg.Series("pairs added", "added", [float(h.pairs_added) for h in hours]),
            svg.Series("pairs removed", "removed", [float(h.pairs_removed) for h in hours]),
            labels,
            chart_id="pairs-changed",
            title="Pairs added and removed, per hour (last 24 hours)",
            tips=tips,
        )
        durations = svg.bars_with_marks(
            svg.Series("longest", "longest", [h.duration_max_s for h in hours]),
            svg.Series("mean", "mean", [h.duration_avg_s for h in hours]),
            labels,
            chart_id="run-duration",
            title="Run duration, per hour (last 24 hours)",
            tips=tips,
        )
        status_keys = [(status, status) for status in CHART_STATUSES]
        return (
            '<div class="charts">'
            f"<figure><figcaption>Runs by status</figcaption>{runs}"
            f"{self.legend(status_keys)}</figure>"
            f"<figure><figcaption>Pairs added and removed</figcaption>{pairs}"
            f"{self.legend([('added', 'added'), ('removed', 'removed')])}</figure>"
            f"<figure><figcaption>Run duration</figcaption>{durations}"
            f"{self.legend([('longest', 'longest run'), ('mean', 'mean')])}</figure>"
            "</div>"
        )

    # --- tenants -------------------------------------------------------------------------

    def recent_charts(self, tenant: str) -> tuple[str, str]:
        found = self.data.history
        if found is None:
            return ('<span class="muted">-</span>',) * 2
        runs = found.recent.get(tenant)
        if not runs:
            return ('<span class="muted">no runs yet</span>',) * 2
        durations = svg.strip(
            runs.durations_s,
            tuple(status if status in COLOURS else "none" for status in runs.statuses),
            slots=history.RECENT_RUNS,
            chart_id="recent-duration",
            title=runs_summary(runs),
        )
        added, removed = sum(runs.pairs_added), sum(runs.pairs_removed)
        changes = svg.change_strip(
            runs.pairs_added,
            runs.pairs_removed,
            slots=history.RECENT_RUNS,
            chart_id="recent-pairs",
            title=f"Pairs changed by the last {len(runs)} runs: +{added} \u2212{removed}",
        )
        return durations, changes

    def tenant_row(self, row: Mapping[str, Any]) -> str:
        now = self.data.now
        name = str(row.get("tenant", ""))
        state = state_of(row)
        failures = int(row.get("consecutive_failures") or 0)
        badge_text = state if state != "none" else "not run yet"
        if state == "failed" and failures > 1:
            badge_text = f"failed \u00d7{failures}"
        title = row.get("waiting_for") or row.get("schedule") or ""
        badge = (
            f'<span class="badge bg-{state}" data-state="{state}" title="{self.text(title)}">'
            f"{self.text(badge_text)}</span>"
        )
        last_success = _moment(row.get("last_success_at"))
        stale = self.stale(row)
        age = (
            "never" if last_success is None else duration_text((now - last_success).total_seconds())
        )
        age_title = _utc(last_success) if last_success else "no succeeded run known"
        age_css = "stale" if stale else ("fresh" if last_success else "muted")
        pairs = row.get("pairs")
        next_run = _moment(row.get("next_run_at"))
        if next_run is None:
            next_text, next_title = "-", "not scheduled"
        else:
            wait_s = (next_run - now).total_seconds()
            next_text = "due" if wait_s <= 0 else f"in {duration_text(math.ceil(wait_s))}"
            next_title = _utc(next_run)
        error = row.get("last_error")
        error_cell = (
            f'<td class="error" title="{self.text(error)}">{self.text(shorten(str(error)))}</td>'
            if error
            else '<td class="muted">-</td>'
        )
        durations, changes = self.recent_charts(name)
        attention = " attention" if self.attention(row) else ""
        return (
            f'<tr class="tenant{attention}" data-tenant="{self.text(name)}">'
            f'<td class="name">{self.text(name)}</td>'
            f"<td>{badge}</td>"
            f'<td class="age {age_css}" title="{self.text(age_title)}">'
            f"{self.text(age)}</td>"
            f'<td class="num">{"-" if pairs is None else f"{int(pairs):,}"}</td>'
            f'<td title="{self.text(next_title)}">{self.text(next_text)}</td>'
            f"<td>{durations}</td><td>{changes}</td>"
            f"{error_cell}</tr>"
        )

    def others(self, rows: Sequence[Mapping[str, Any]]) -> str:
        """The tenants beyond the detailed ones: each name under its status."""
        if not rows:
            return ""
        groups: dict[str, list[str]] = {}
        for row in rows:
            name = self.text(row.get("tenant", ""))
            css = "other stale" if self.attention(row) else "other"
            groups.setdefault(state_of(row), []).append(
                f'<span class="{css}" data-tenant="{name}">{name}</span>'
            )
        items = "".join(
            f'<li class="group" data-group="{state}"><span class="badge bg-{state}">'
            f"{state if state != 'none' else 'not run yet'}</span> {len(names)}: "
            f"{', '.join(names)}</li>"
            for state, names in groups.items()
        )
        return (
            f'<p class="meta" data-others="{len(rows)}">{len(rows)} more tenants, by status '
            '(every tenant\'s details: <a href="/status">/status</a>):</p>'
            f'<ul class="others">{items}</ul>'
        )

    def tenants(self) -> str:
        rows = self.data.tenants
        if not rows:
            return '<p class="muted">No tenants configured: add [[tenants]] and send SIGHUP.</p>'
        # As `ordered`, each row's staleness told once.
        listed = sorted(rows, key=lambda row: not self.attention(row))
        limit = max(self.data.detailed_tenants, 0)
        body = "".join(self.tenant_row(row) for row in listed[:limit])
        return (
            '<table class="tenants"><thead><tr><th>Tenant</th><th>Status</th>'
            f"<th>Since last success</th><th>Pairs</th><th>Next run</th>"
            f"<th>Last {history.RECENT_RUNS} runs: duration</th><th>Pairs changed</th>"
            f"<th>Last error</th></tr></thead><tbody>{body}</tbody></table>"
            f"{self.others(listed[limit:])}"
        )

    def document(self, refresh_s: int) -> str:
        data = self.data
        ready = all(reason is None for reason in data.checks.values())
        return (
            "<!doctype html>"
            '<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="refresh" content="{int(refresh_s)}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>syncd: {'ready' if ready else 'NOT READY'}</title>"
            f"<style>{_css()}</style></head><body>"
            f"<header><h1>syncd</h1>{self.readiness()}"
            f'<p class="meta">As of {_utc(data.now)}; this page reloads every {refresh_s} s. '
            'Machine-readable: <a href="/status">/status</a> (JSON), '
            '<a href="/metrics">/metrics</a> (Prometheus), <a href="/readyz">/readyz</a>.</p>'
            "</header><main>"
            f"<h2>Last 24 hours, all tenants (UTC)</h2>{self.charts()}"
            f"<h2>Tenants</h2>{self.summary(data.tenants)}{self.tenants()}"
            "</main></body></html>"
        )


def render(data: PageData, *, scrub: Scrub = str, refresh_s: int = REFRESH_S) -> str:
    """The status page for `data`. `scrub` removes known secrets from every string shown."""
    return _Page(data, scrub).document(refresh_s)
