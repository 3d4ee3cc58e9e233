"""The status page's HTML and its SVG charts, as pure functions of their data.

The rendered document is parsed with the standard library's HTML parser, so the checks are
about elements, attributes and text, as a browser would see them, not about substrings.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from syncd import history, page, svg
from tests.webapp import Tree, strip_bars

NOW = datetime(2026, 11, 30, 14, 25, 7, tzinfo=UTC)
HOSTILE = "<script>alert(1)</script> & co"


def row(name: str, **fields: Any) -> dict[str, Any]:
    """A scheduler status row, healthy unless told otherwise."""
    base: dict[str, Any] = {
        "tenant": name,
        "schedule": "every 900s",
        "period_s": 900.0,
        "running": False,
        "queued": False,
        "waiting_for": None,
        "last_status": "succeeded",
        "last_error": None,
        "last_success_at": (NOW - timedelta(minutes=3)).isoformat(),
        "pairs": 1234,
        "next_run_at": (NOW + timedelta(minutes=12)).isoformat(),
        "consecutive_failures": 0,
    }
    return base | fields


def some_history(recent: Mapping[str, history.RecentRuns]) -> history.History:
    current = int(NOW.timestamp() // 3600)
    rows = [
        (current, "succeeded", 4, 12, 3, 2.0, 5.0),
        (current, "failed", 2, 0, 0, 0.5, 1.0),
        (current - 5, "partial", 1, 7, 0, 9.0, 9.0),
    ]
    return history.History(hours=history.fill_hours(rows, NOW), recent=recent)


def runs(*statuses: str) -> history.RecentRuns:
    """Runs every 15 minutes up to NOW, lasting 1, 2, 3 ... s, adding 0, 1, 2 ... pairs."""
    count = len(statuses)
    return history.RecentRuns(
        statuses=statuses,
        durations_s=tuple(None if s == "running" else 1.0 + i for i, s in enumerate(statuses)),
        pairs_added=tuple(range(count)),
        pairs_removed=tuple(1 if status == "partial" else 0 for status in statuses),
        first_started_at=NOW - timedelta(minutes=15 * count),
        last_started_at=NOW - timedelta(minutes=15),
    )


def render(**overrides: Any) -> Tree:
    data = {
        "checks": {"database": None, "schema": None, "scheduler": None},
        "tenants": [row("acme")],
        "now": NOW,
        "history": some_history({"acme": runs("succeeded", "succeeded")}),
    } | overrides
    return Tree(page.render(page.PageData(**data)))


# --- the document ------------------------------------------------------------------------


def test_a_self_contained_page_that_refreshes_itself() -> None:
    document = page.render(
        page.PageData(
            checks={"database": None}, tenants=[row("acme")], now=NOW, history=some_history({})
        )
    )
    tree = Tree(document)
    refresh = tree.root.find_all("meta", http_equiv="refresh")
    assert [meta.attrs["content"] for meta in refresh] == [str(page.REFRESH_S)]
    # Nothing to load and nothing to run: no scripts, no sources, no external URLs.
    assert not tree.root.find_all("script") and not tree.root.find_all("link")
    assert not [el for el in tree.root.find_all() if "src" in el.attrs]
    assert "http://" not in document and "https://" not in document
    assert "url(" not in document and "@import" not in document
    assert tree.root.find_all("title")[0].text() == "syncd: ready"


def test_readiness_in_words_and_colour() -> None:
    ready = render()
    badge = ready.root.with_class("ready")[0]
    assert (badge.text(), "ok" in badge.classes()) == ("Ready", True)

    broken = render(
        checks={
            "database": "cannot reach the database: <refused>",
            "schema": None,
            "scheduler": None,
        }
    )
    badge = broken.root.with_class("ready")[0]
    assert (badge.text(), "bad" in badge.classes()) == ("Not ready", True)
    checks = {el.attrs["data-check"]: el for el in broken.root.with_class("check")}
    assert checks["database"].text() == "database: cannot reach the database: <refused>"
    assert "bad" in checks["database"].classes() and "ok" in checks["schema"].classes()
    assert broken.root.find_all("title")[0].text() == "syncd: NOT READY"


def test_every_string_is_escaped() -> None:
    hostile_error = '<img src=x onerror="alert(2)"> "quoted" & more'
    document = page.render(
        page.PageData(
            checks={"<b>database</b>": "<i>down</i>"},
            tenants=[
                row(HOSTILE, last_status="failed", last_error=hostile_error),
                row('say "hi"', schedule="<every>", waiting_for="<blocked>"),
            ],
            now=NOW,
            history=some_history({HOSTILE: runs("failed")}),
        )
    )
    assert "<script" not in document and "<img" not in document and "<b>" not in document
    tree = Tree(document)
    names = [el.text() for el in tree.root.with_class("name")]
    assert HOSTILE in names and 'say "hi"' in names
    assert {el.attrs["data-tenant"] for el in tree.root.with_class("tenant")} == {
        HOSTILE,
        'say "hi"',
    }
    error = tree.root.with_class("error")[0]
    assert error.attrs["title"] == hostile_error
    assert error.text() == hostile_error
    assert [el.text() for el in tree.root.with_class("check")] == ["<b>database</b>: <i>down</i>"]


def test_known_secrets_are_scrubbed_before_escaping() -> None:
    secret = "k&y<secret>"
    data = page.PageData(
        checks={"database": None},
        tenants=[row("acme", last_status="failed", last_error=f"refused key {secret}")],
        now=NOW,
    )
    document = page.render(data, scrub=lambda text: text.replace(secret, "[REDACTED]"))
    assert "secret" not in document
    assert Tree(document).root.with_class("error")[0].text() == "refused key [REDACTED]"


def test_tenant_rows_status_age_pairs_next_run_and_error() -> None:
    long_error = "HTTP 403: the account lacks a role " + "x" * 200 + "\nsecond line"
    tree = render(
        tenants=[
            row("fresh", last_success_at=(NOW - timedelta(minutes=44)).isoformat()),
            row(
                "stale",
                last_status="failed",
                consecutive_failures=3,
                last_error=long_error,
                last_success_at=(NOW - timedelta(minutes=46)).isoformat(),
                next_run_at=(NOW - timedelta(seconds=1)).isoformat(),
            ),
            row("new", last_status=None, last_success_at=None, pairs=None, next_run_at=None),
            row("busy", running=True),
        ]
    )
    rows = {el.attrs["data-tenant"]: el for el in tree.root.with_class("tenant")}
    # Failing and stale tenants come first.
    assert list(rows) == ["stale", "fresh", "new", "busy"]

    stale = rows["stale"]
    badge = stale.with_class("badge")[0]
    assert badge.text() == "failed \u00d73" and "bg-failed" in badge.classes()
    age = stale.with_class("age")[0]
    assert (age.text(), "stale" in age.classes()) == ("46m", True)
    error = stale.with_class("error")[0]
    assert len(error.text()) == page.ERROR_PREVIEW_CHARS
    assert error.text().endswith("\u2026") and error.attrs["title"] == long_error
    assert "due" in stale.text()
    assert "attention" in stale.classes()

    fresh = rows["fresh"]
    age = fresh.with_class("age")[0]
    assert (age.text(), "fresh" in age.classes()) == ("44m", True)
    assert "1,234" in fresh.text() and "in 12m" in fresh.text()
    assert "attention" not in fresh.classes()

    new = rows["new"]
    assert new.with_class("badge")[0].text() == "not run yet"
    assert "stale" not in new.with_class("age")[0].classes()
    assert rows["busy"].with_class("badge")[0].attrs["data-state"] == "running"


def test_charts_of_the_last_day_and_of_each_tenants_last_runs() -> None:
    tree = render(
        tenants=[row("acme"), row("globex")],
        history=some_history({"acme": runs("succeeded", "failed", "partial", "running")}),
    )
    charts = {el.attrs["data-chart"]: el for el in tree.root.find_all("svg")}
    assert {"runs-by-status", "pairs-changed", "run-duration"} <= set(charts)
    by_status = charts["runs-by-status"].find_all("rect")
    assert {"fill-succeeded", "fill-failed", "fill-partial"} <= {
        css for rect in by_status for css in rect.classes()
    }
    assert any("2 failed" in rect.text() for rect in by_status)

    acme = tree.root.find_all("tr", data_tenant="acme")[0]
    strip = acme.find_all("svg", data_chart="recent-duration")[0]
    assert [css for _, _, css in strip_bars(strip)] == [
        "fill-succeeded",
        "fill-failed",
        "fill-partial",
        "fill-running",
    ]
    summary = strip.find_all("title")[0].text()
    assert summary.startswith("Last 4 runs, ")
    assert "1 succeeded, 1 failed, 1 partial, 1 running; 1 s to 3 s" in summary
    changes = acme.find_all("svg", data_chart="recent-pairs")[0]
    assert changes.find_all("title")[0].text() == "Pairs changed by the last 4 runs: +6 \u22121"
    assert {css for _, _, css in strip_bars(changes)} == {"fill-added", "fill-removed"}
    globex = tree.root.find_all("tr", data_tenant="globex")[0]
    assert "no runs yet" in globex.text() and not globex.find_all("svg")


def test_without_history_the_rows_stay_and_the_reason_shows() -> None:
    tree = render(history=None, history_problem="cannot read the run history: <timeout>")
    assert not tree.root.find_all("svg")
    note = tree.root.find_all(data_charts_unavailable="")[0]
    assert note.text() == "Charts unavailable: cannot read the run history: <timeout>"
    assert tree.root.find_all("tr", data_tenant="acme")


def test_no_tenants() -> None:
    tree = render(tenants=[], history=some_history({}))
    assert "No tenants configured" in tree.root.text()


def test_beyond_the_detailed_tenants_every_name_is_listed_under_its_status() -> None:
    rows = [
        row("a"),
        row(HOSTILE),
        row("b"),
        row("failing", last_status="failed", last_error="HTTP 403"),
        row(
            "stale",
            last_status="partial",
            last_success_at=(NOW - timedelta(hours=2)).isoformat(),
        ),
        row("new", last_status=None, last_success_at=None, pairs=None),
    ]
    recent = {name: runs("succeeded") for name in ("a", HOSTILE, "b", "failing", "stale")}

    def rendered(limit: int) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
        document = page.render(
            page.PageData(
                checks={"database": None},
                tenants=rows,
                now=NOW,
                history=some_history(recent),
                detailed_tenants=limit,
            )
        )
        assert "<script" not in document
        tree = Tree(document)
        detailed = [el.attrs["data-tenant"] for el in tree.root.with_class("tenant")]
        others = {el.attrs["data-tenant"]: el for el in tree.root.with_class("other")}
        groups = {el.attrs["data-group"]: el for el in tree.root.with_class("group")}
        # Every tenant once: in full or by name.
        assert sorted([*detailed, *others]) == sorted(str(r["tenant"]) for r in rows)
        # The history is read for the detailed tenants alone, and they alone have charts.
        assert detailed == page.detailed(rows, NOW, limit)
        charted = [name for name in detailed if name in recent]
        assert len(tree.root.find_all("svg", data_chart="recent-duration")) == len(charted)
        return detailed, others, groups

    detailed, others, groups = rendered(3)
    assert detailed == ["failing", "stale", "a"]  # problems first, then the config's order
    assert list(groups) == ["succeeded", "none"]
    assert {el.attrs["data-tenant"] for el in groups["succeeded"].with_class("other")} == {
        HOSTILE,
        "b",
    }
    assert groups["succeeded"].with_class("badge")[0].text() == "succeeded"
    assert groups["none"].with_class("badge")[0].text() == "not run yet"
    assert others[HOSTILE].text() == HOSTILE
    assert "stale" not in others["b"].classes()

    # More problems than room: the rest are listed under their status, marked.
    detailed, others, groups = rendered(1)
    assert detailed == ["failing"]
    assert list(groups) == ["partial", "succeeded", "none"]
    assert "stale" in others["stale"].classes()

    # Below the limit nothing is summarized.
    assert not rendered(page.DETAILED_TENANTS)[1]


# --- helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (60, "1m"), (61, "1m 1s"), (3 * 3600 + 300, "3h 5m"), (86400, "1d")],
)
def test_duration_text(seconds: float, text: str) -> None:
    assert page.duration_text(seconds) == text


def test_shorten() -> None:
    assert page.shorten("short") == "short"
    assert page.shorten("first\nsecond") == "first \u2026"
    assert page.shorten("x" * 200, 10) == "x" * 9 + "\u2026"
    assert page.shorten("") == ""


def test_since_success_turns_stale_after_three_periods() -> None:
    def age(minutes: float, period_s: float = 900.0) -> tuple[str, bool]:
        success = (NOW - timedelta(minutes=minutes)).isoformat()
        return page.since_success(row("t", last_success_at=success, period_s=period_s), NOW)

    assert age(44) == ("44m", False)
    assert age(45.1)[1] is True
    assert age(4, period_s=60.0)[1] is True
    assert page.since_success(row("t", last_success_at=None, last_status=None), NOW) == (
        "never",
        False,
    )
    assert page.since_success(row("t", last_success_at=None, last_status="failed"), NOW)[1]


# --- svg ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ceiling"),
    [(0, 1), (0.3, 0.5), (1, 1), (7, 10), (12, 20), (23, 25), (40, 50), (1001, 2000)],
)
def test_nice_ceiling(value: float, ceiling: float) -> None:
    assert svg.nice_ceiling(value) == pytest.approx(ceiling)


def test_stacked_bars_scale_to_the_tallest_stack() -> None:
    chart = Tree(
        svg.stacked_bars(
            [svg.Series("ok", "succeeded", [2, 0, 8]), svg.Series("bad", "failed", [0, 1, 2])],
            ["a", "", "c"],
            chart_id="x",
            title="T <&>",
            tips=["a", "b", "c"],
        )
    ).root
    rects = chart.find_all("rect")
    heights = {rect.text(): float(rect.attrs["height"]) for rect in rects}
    plot = svg.HEIGHT - svg.TOP - svg.BOTTOM
    assert heights["c: 8 ok"] == pytest.approx(plot * 8 / 10, abs=0.1)
    assert heights["a: 2 ok"] == pytest.approx(plot * 2 / 10, abs=0.1)
    assert len(rects) == 4
    labels = [text.text() for text in chart.find_all("text")]
    assert labels[:2] == ["10", "0"] and "a" in labels and "c" in labels
    assert chart.find_all("title")[0].text() == "T <&>"


def test_an_empty_chart_says_so() -> None:
    chart = svg.stacked_bars(
        [svg.Series("ok", "succeeded", [0, 0])], ["", ""], chart_id="x", title="t", tips=["", ""]
    )
    assert "no runs" in chart and "<rect" not in chart


def test_strip_puts_the_newest_run_at_the_right() -> None:
    chart = Tree(
        svg.strip(
            (1.0, 4.0, None),
            ("succeeded", "failed", "running"),
            slots=4,
            chart_id="s",
            title="t <&>",
        )
    ).root
    (first, second, third) = strip_bars(chart)
    assert first[0] > svg.STRIP_WIDTH / 4 and third[0] > svg.STRIP_WIDTH * 3 / 4
    assert [css for _, _, css in (first, second, third)] == [
        "fill-succeeded",
        "fill-failed",
        "fill-running",
    ]
    # Relative to the longest, in whole units; a run still going is drawn short.
    assert second[1] == svg.STRIP_HEIGHT
    assert first[1] == pytest.approx(svg.STRIP_HEIGHT / 4, abs=0.5)
    assert 0 < third[1] < first[1]
    assert chart.find_all("title")[0].text() == "t <&>"


def test_value_formats() -> None:
    assert [svg.count_text(v) for v in (0, 7, 950, 1200, 3_400_000)] == [
        "0",
        "7",
        "950",
        "1.2k",
        "3.4M",
    ]
    assert [svg.seconds_text(v) for v in (0.25, 42, 330, 7200)] == [
        "0.25 s",
        "42 s",
        "5.5 min",
        "2 h",
    ]
