"""Read loralab's HTML pages back in tests: tables (cell text and data-value) and charts' data, with the
standard library's parser, so the checks do not depend on the page's own script."""

from __future__ import annotations

import json
from html.parser import HTMLParser


class _PageParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, dict] = {}
        self.charts: dict[str, list[dict]] = {}
        self.hover: dict[str, list[dict]] = {}
        self.urls: list[str] = []
        self._table = self._row = self._cell = None
        self._figure = None
        self._in_head = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href", "action", "poster"):
            if a.get(key):
                self.urls.append(a[key])
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id") or f"table{len(self.tables)}", {"header": [], "rows": []})
            # header: the heading rows (usually one); rows: the body rows; each a list of cells
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            value = a.get("data-value")
            self._cell = {"text": "", "value": None if value is None else float(value), "sort": a.get("data-sort")}
        elif tag == "br" and self._cell is not None:
            self._cell["text"] += "\n"
        elif tag == "figure":
            self._figure = a.get("id")
        elif tag == "svg" and self._figure and "data-series" in a:
            self.charts[self._figure] = json.loads(a["data-series"])
            self.hover[self._figure] = json.loads(a["data-hover"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._cell["text"] = self._cell["text"].strip()
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table["header" if self._in_head else "rows"].append(self._row)
            self._row = None
        elif tag == "thead":
            self._in_head = False
        elif tag == "table":
            self._table = None
        elif tag == "figure":
            self._figure = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def parse_page(text: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(text)
    return parser
