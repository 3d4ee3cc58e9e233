"""The daemon's HTTP app served for real (a socket on 127.0.0.1) around a fixed view, and
its HTML parsed into a tree of elements to check what a browser would see."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable
from html.parser import HTMLParser
from typing import Any

import aiohttp

from syncd import metrics, web


class StaticView:
    """A daemon view (web.DaemonView) with fixed readiness checks and tenant rows."""

    def __init__(
        self,
        tenants: list[dict[str, Any]] | None = None,
        checks: dict[str, str | None] | None = None,
    ) -> None:
        self.rows = tenants or []
        self.readiness = checks or {"database": None, "schema": None, "scheduler": None}

    def checks(self) -> dict[str, str | None]:
        return dict(self.readiness)

    def tenants(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self.rows]


@contextlib.asynccontextmanager
async def served(
    view: StaticView,
    registry: metrics.Metrics | None = None,
    *,
    read_history: web.HistoryReader | None = None,
    scrub: Callable[[str], str] = str,
) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """(a client session, the base URL) of `web.create_app` serving `view`."""
    app = web.create_app(
        view, registry or metrics.Metrics(), scrub=scrub, read_history=read_history
    )
    async with web.serve(app, "127.0.0.1", 0) as (host, port), aiohttp.ClientSession() as session:
        yield session, f"http://{host}:{port}"


class Element:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Element] = []
        self.texts: list[str] = []

    def text(self) -> str:
        return "".join(self.texts) + "".join(child.text() for child in self.children)

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Element]:
        found = []
        for child in self.children:
            if (tag is None or child.tag == tag) and all(
                child.attrs.get(key.replace("_", "-")) == value for key, value in attrs.items()
            ):
                found.append(child)
            found.extend(child.find_all(tag, **attrs))
        return found

    def with_class(self, css: str) -> list[Element]:
        return [element for element in self.find_all() if css in element.classes()]


VOID = {"meta", "br", "img", "input", "link", "hr"}


class Tree(HTMLParser):
    """The document as a tree of elements (text kept in order per element, simplified)."""

    def __init__(self, document: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#root", {}, None)
        self.current = self.root
        self.feed(document)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(element)
        if tag not in VOID:
            self.current = element

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.current.children.append(Element(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        node: Element | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        assert node is not None and node.parent is not None, f"unbalanced </{tag}>"
        self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.texts.append(data)


_BOX = re.compile(r"M(-?[\d.]+) (-?[\d.]+)h(-?[\d.]+)v(-?[\d.]+)h-[\d.]+z")


def strip_bars(chart: Element) -> list[tuple[float, float, str]]:
    """(x, height, colour class) of every bar of a strip chart (paths of boxes), by x."""
    bars = []
    for path in chart.find_all("path"):
        (css,) = [name for name in path.classes() if name.startswith("fill-")]
        for match in _BOX.finditer(path.attrs["d"]):
            bars.append((float(match[1]), float(match[4]), css))
    return sorted(bars)
