"""Charts as inline SVG: pure functions from numbers to markup.

No scripts and no external assets, so the page that embeds them works on an air-gapped host
under a strict Content-Security-Policy. Colours come from CSS classes of the embedding page
(`fill-<name>`); every text that reaches the markup (labels, tooltips) is HTML-escaped here.
Hovering a bar shows its `<title>`.
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Chart geometry in SVG user units; the page scales the whole drawing to its box.
WIDTH = 360.0
HEIGHT = 140.0
LEFT = 44.0  # room for the y-axis labels
RIGHT = 4.0
TOP = 8.0
BOTTOM = 18.0  # room for the x-axis labels
BAR_GAP = 0.2  # fraction of a slot left empty between bars

STRIP_WIDTH = 120.0
STRIP_HEIGHT = 26.0
MIN_BAR = 1.5  # a bar for a value above zero is always visible
# Strips are remembered by their (hashable) arguments: between two views of a page most
# tenants have not run, so most strips are drawn once, not on every refresh.
STRIP_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Series:
    """Values of one kind (a status, "added"); `css` names the colour class `fill-<css>`."""

    name: str
    css: str
    values: Sequence[float | None]


Formatter = Callable[[float], str]


def esc(text: str) -> str:
    """`text` escaped for element content and quoted attribute values."""
    return html.escape(text, quote=True)


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5 or 5 times a power of ten that is at least `value`."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if step * power >= value * (1 - 1e-9):
            return step * power
    return 10.0 * power


def count_text(value: float) -> str:
    """A count as people read it: 950, 1.2k, 3.4M."""
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.3g}M"
    if magnitude >= 1e3:
        return f"{value / 1e3:.3g}k"
    return f"{value:.3g}" if value != int(value) else str(int(value))


def seconds_text(value: float) -> str:
    """A duration in the coarsest unit that keeps it readable: 0.25 s, 42 s, 5.5 min, 2 h."""
    if value < 60:
        return f"{value:.2g} s" if value < 10 else f"{value:.0f} s"
    if value < 3600:
        return f"{value / 60:.2g} min"
    return f"{value / 3600:.2g} h"


def _n(value: float) -> str:
    """A coordinate: short, and never in exponent notation."""
    return f"{value:.1f}".removesuffix(".0")


def _rect(x: float, y: float, width: float, height: float, css: str, tip: str) -> str:
    return (
        f'<rect class="bar fill-{esc(css)}" x="{_n(x)}" y="{_n(y)}" width="{_n(width)}" '
        f'height="{_n(height)}"><title>{esc(tip)}</title></rect>'
    )


def _frame(
    chart_id: str, title: str, body: str, *, width: float, height: float, css: str = "chart"
) -> str:
    return (
        f'<svg class="{css}" data-chart="{esc(chart_id)}" viewBox="0 0 {_n(width)} '
        f'{_n(height)}" role="img" aria-label="{esc(title)}">'
        f"<title>{esc(title)}</title>{body}</svg>"
    )


def _axes(top_label: str, bottom_label: str, x_labels: Sequence[str], *, zero_y: float) -> str:
    """Y labels at the top and bottom of the plot, a base line at `zero_y`, x labels below."""
    plot_width = WIDTH - LEFT - RIGHT
    parts = [
        f'<line class="grid" x1="{_n(LEFT)}" y1="{_n(TOP)}" x2="{_n(WIDTH - RIGHT)}" '
        f'y2="{_n(TOP)}"/>',
        f'<line class="axis" x1="{_n(LEFT)}" y1="{_n(zero_y)}" x2="{_n(WIDTH - RIGHT)}" '
        f'y2="{_n(zero_y)}"/>',
        f'<text class="label" x="{_n(LEFT - 4)}" y="{_n(TOP + 4)}" text-anchor="end">'
        f"{esc(top_label)}</text>",
        f'<text class="label" x="{_n(LEFT - 4)}" y="{_n(HEIGHT - BOTTOM)}" '
        f'text-anchor="end">{esc(bottom_label)}</text>',
    ]
    slot = plot_width / max(len(x_labels), 1)
    for index, label in enumerate(x_labels):
        if label:
            x = LEFT + slot * index
            parts.append(
                f'<text class="label" x="{_n(x)}" y="{_n(HEIGHT - 4)}">{esc(label)}</text>'
            )
    return "".join(parts)


def _empty_note(has_data: bool) -> str:
    if has_data:
        return ""
    x, y = LEFT + (WIDTH - LEFT - RIGHT) / 2, TOP + (HEIGHT - TOP - BOTTOM) / 2
    return f'<text class="empty" x="{_n(x)}" y="{_n(y)}" text-anchor="middle">no runs</text>'


def stacked_bars(
    series: Sequence[Series],
    x_labels: Sequence[str],
    *,
    chart_id: str,
    title: str,
    tips: Sequence[str],
    fmt: Formatter = count_text,
) -> str:
    """One bar per x label, `series` stacked bottom-up in order; `tips[i]` names slot i."""
    slots = len(x_labels)
    totals = [sum(s.values[i] or 0.0 for s in series) for i in range(slots)]
    top = nice_ceiling(max(totals, default=0.0))
    plot_height = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / max(slots, 1)
    bars = []
    for index in range(slots):
        base = HEIGHT - BOTTOM
        for one in series:
            value = one.values[index] or 0.0
            if value <= 0:
                continue
            height = max(value / top * plot_height, MIN_BAR)
            base -= height
            x = LEFT + slot * index + slot * BAR_GAP / 2
            tip = f"{tips[index]}: {fmt(value)} {one.name}"
            bars.append(_rect(x, base, slot * (1 - BAR_GAP), height, one.css, tip))
    body = _axes(fmt(top), "0", x_labels, zero_y=HEIGHT - BOTTOM)
    return _frame(
        chart_id,
        title,
        body + "".join(bars) + _empty_note(any(totals)),
        width=WIDTH,
        height=HEIGHT,
    )


def diverging_bars(
    up: Series,
    down: Series,
    x_labels: Sequence[str],
    *,
    chart_id: str,
    title: str,
    tips: Sequence[str],
    fmt: Formatter = count_text,
) -> str:
    """`up` above a middle zero line and `down` below it, on one scale."""
    slots = len(x_labels)
    largest = max((v or 0.0 for v in (*up.values, *down.values)), default=0.0)
    top = nice_ceiling(largest)
    half = (HEIGHT - TOP - BOTTOM) / 2
    zero = TOP + half
    slot = (WIDTH - LEFT - RIGHT) / max(slots, 1)
    bars = []
    for index in range(slots):
        x = LEFT + slot * index + slot * BAR_GAP / 2
        width = slot * (1 - BAR_GAP)
        added = up.values[index] or 0.0
        removed = down.values[index] or 0.0
        if added > 0:
            height = max(added / top * half, MIN_BAR)
            tip = f"{tips[index]}: {fmt(added)} {up.name}"
            bars.append(_rect(x, zero - height, width, height, up.css, tip))
        if removed > 0:
            height = max(removed / top * half, MIN_BAR)
            tip = f"{tips[index]}: {fmt(removed)} {down.name}"
            bars.append(_rect(x, zero, width, height, down.css, tip))
    body = _axes(f"+{fmt(top)}", f"\u2212{fmt(top)}", x_labels, zero_y=zero)
    return _frame(
        chart_id,
        title,
        body + "".join(bars) + _empty_note(largest > 0),
        width=WIDTH,
        height=HEIGHT,
    )


def bars_with_marks(
    bars: Series,
    marks: Series,
    x_labels: Sequence[str],
    *,
    chart_id: str,
    title: str,
    tips: Sequence[str],
    fmt: Formatter = seconds_text,
) -> str:
    """`bars` as bars and `marks` as short horizontal ticks, on one scale (e.g. longest
    and mean duration)."""
    slots = len(x_labels)
    largest = max((v or 0.0 for v in (*bars.values, *marks.values)), default=0.0)
    top = nice_ceiling(largest) if largest > 0 else 1.0
    plot_height = HEIGHT - TOP - BOTTOM
    base = HEIGHT - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / max(slots, 1)
    parts = []
    for index in range(slots):
        x = LEFT + slot * index + slot * BAR_GAP / 2
        width = slot * (1 - BAR_GAP)
        value = bars.values[index]
        if value is not None:
            height = max(value / top * plot_height, MIN_BAR)
            tip = f"{tips[index]}: {bars.name} {fmt(value)}"
            parts.append(_rect(x, base - height, width, height, bars.css, tip))
        mark = marks.values[index]
        if mark is not None:
            y = base - mark / top * plot_height
            tip = f"{tips[index]}: {marks.name} {fmt(mark)}"
            parts.append(_rect(x - 1, y - 1, width + 2, 2.0, marks.css, tip))
    body = _axes(fmt(top), "0", x_labels, zero_y=base)
    return _frame(
        chart_id,
        title,
        body + "".join(parts) + _empty_note(largest > 0),
        width=WIDTH,
        height=HEIGHT,
    )


def _bars_path(css: str, boxes: Sequence[tuple[float, float, float, float]]) -> str:
    """Boxes (x, y, width, height) of one colour as one path: a strip per tenant stays a few
    hundred bytes, so a page of a thousand tenants stays small and quick to draw."""
    # Whole units (rounded: %d truncates the + 0.5): a strip is drawn at its own size in CSS
    # pixels, so that is exact enough, and it formats several times faster than floats.
    d = "".join(
        [
            "M%d %dh%dv%dh-%dz" % (x + 0.5, y + 0.5, w + 0.5, h + 0.5, w + 0.5)  # noqa: UP031
            for x, y, w, h in boxes
        ]
    )
    return f'<path class="fill-{esc(css)}" d="{d}"/>'


@functools.lru_cache(maxsize=STRIP_CACHE_SIZE)
def strip(
    values: tuple[float | None, ...],
    colours: tuple[str, ...],
    *,
    slots: int,
    chart_id: str,
    title: str,
) -> str:
    """A small bar chart of the last `slots` values (`colours[i]` the class of bar i), newest
    at the right; heights relative to the largest. A bar without a value (a run still going)
    is drawn short. `title` (the tooltip) summarizes them: single bars have none."""
    count = min(len(values), len(colours), slots)
    values, colours = values[len(values) - count :], colours[len(colours) - count :]
    largest = max((value or 0.0 for value in values), default=0.0)
    slot = STRIP_WIDTH / max(slots, 1)
    offset = slots - count
    by_colour: dict[str, list[tuple[float, float, float, float]]] = {}
    for index, (value, css) in enumerate(zip(values, colours, strict=True)):
        fraction = (value or 0.0) / largest if largest > 0 else 0.0
        height = MIN_BAR * 2 if value is None else max(fraction * STRIP_HEIGHT, MIN_BAR)
        x = slot * (offset + index) + slot * BAR_GAP / 2
        box = (x, STRIP_HEIGHT - height, slot * (1 - BAR_GAP), height)
        by_colour.setdefault(css, []).append(box)
    axis = (
        f'<line class="axis" x1="0" y1="{_n(STRIP_HEIGHT - 0.5)}" x2="{_n(STRIP_WIDTH)}" '
        f'y2="{_n(STRIP_HEIGHT - 0.5)}"/>'
    )
    body = axis + "".join(_bars_path(css, boxes) for css, boxes in by_colour.items())
    return _frame(chart_id, title, body, width=STRIP_WIDTH, height=STRIP_HEIGHT, css="chart strip")


@functools.lru_cache(maxsize=STRIP_CACHE_SIZE)
def change_strip(
    added: tuple[int, ...], removed: tuple[int, ...], *, slots: int, chart_id: str, title: str
) -> str:
    """A small diverging chart: pairs added above the middle line, removed below it."""
    count = min(len(added), len(removed), slots)
    added, removed = added[len(added) - count :], removed[len(removed) - count :]
    largest = max((*added, *removed), default=0)
    half = STRIP_HEIGHT / 2
    slot = STRIP_WIDTH / max(slots, 1)
    offset = slots - count
    ups, downs = [], []
    for index in range(count):
        x = slot * (offset + index) + slot * BAR_GAP / 2
        width = slot * (1 - BAR_GAP)
        if added[index] > 0:
            height = max(added[index] / largest * half, MIN_BAR)
            ups.append((x, half - height, width, height))
        if removed[index] > 0:
            height = max(removed[index] / largest * half, MIN_BAR)
            downs.append((x, half, width, height))
    body = f'<line class="axis" x1="0" y1="{_n(half)}" x2="{_n(STRIP_WIDTH)}" y2="{_n(half)}"/>'
    if ups:
        body += _bars_path("added", ups)
    if downs:
        body += _bars_path("removed", downs)
    return _frame(chart_id, title, body, width=STRIP_WIDTH, height=STRIP_HEIGHT, css="chart strip")
