"""Building blocks of loralab's self-contained HTML pages (``report.html``, ``loralab compare``).

Pure functions: values in, HTML strings out. The report stage and the compare command read the run
directories and choose what to show; this module only renders. A page carries its CSS, its script and
its images inline and fetches nothing, so the file can be mailed, archived or opened offline.

Charts are hand-written SVG with a few lines of script for the hover readout, and tables sort and filter
with a few more: a charting library would have to be inlined (hundreds of kB) to keep the page
self-contained, and these pages need only lines, points and a readout.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Series colours: matplotlib's default cycle, so the HTML and PNG figures agree.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")

# Chart geometry in SVG user units; the SVG scales to the page width.
CHART_W, CHART_H = 720, 260
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 16, 14, 40


def esc(value: object) -> str:
    """``value`` as text, escaped for HTML content and attributes."""
    return html.escape(str(value), quote=True)


def inline_code(text: str) -> str:
    """Escape ``text`` and turn Markdown's `inline code` spans into ``<code>`` elements."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text))


@dataclass(frozen=True)
class Cell:
    """One table cell: ``text`` is shown (escaped); ``value``, when given, is what sorting uses and what
    tests read back (``data-value``); ``cls`` is a CSS class (``num``, ``up``, ``down``, ``long``)."""

    text: str
    value: float | None = None
    cls: str = ""
    html: bool = False  # ``text`` is already HTML


def _heading(name: str) -> str:
    """A column heading that wraps, when its column is narrow, between words and not inside one
    ("ROUGE-L base" never as "ROUGE-" over "L base"); a long word may still break, so the table fits."""
    return " ".join(f'<span class="word">{esc(w)}</span>' if 1 < len(w) <= 16 else esc(w) for w in name.split(" "))


def _cell(cell: Cell | str, tag: str = "td") -> str:
    if not isinstance(cell, Cell):
        cell = Cell(str(cell))
    attrs = ""
    if cell.value is not None:
        attrs += f' data-value="{_number(cell.value)}"'
    if cell.cls:
        attrs += f' class="{esc(cell.cls)}"'
    return f"<{tag}{attrs}>{cell.text if cell.html else esc(cell.text)}</{tag}>"


def _number(value: float) -> str:
    # repr round-trips a float exactly; NaN sorts last (see the script) and reads back as NaN.
    return "NaN" if isinstance(value, float) and math.isnan(value) else repr(value)


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[Cell | str]],
    *,
    table_id: str = "",
    sortable: Sequence[int] = (),
    filter_label: str = "",
) -> str:
    """An HTML table. Columns whose index is in ``sortable`` sort on click (by their cells' ``value``);
    a non-empty ``filter_label`` adds a text box above the table that hides rows not containing the text."""
    ths = []
    for i, name in enumerate(header):
        if i in sortable:
            ths.append(f'<th data-sort="{i}" aria-sort="none"><button type="button">{_heading(name)}</button></th>')
        else:
            ths.append(f"<th>{_heading(name)}</th>")
    body = "\n".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    id_attr = f' id="{esc(table_id)}"' if table_id else ""
    out = f'<table{id_attr} class="data"><thead><tr>{"".join(ths)}</tr></thead>\n<tbody>\n{body}\n</tbody></table>'
    if filter_label:
        out = (
            f'<div class="filter"><label>{esc(filter_label)} <input type="search" data-filter="{esc(table_id)}" '
            f'placeholder="text in any column"></label> <span class="count" data-count="{esc(table_id)}">'
            f"{len(rows)} of {len(rows)} rows</span></div>\n" + out
        )
    return f'<div class="table-wrap">{out}</div>'


def change_cell(base: float, lora: float, lower_is_better: bool = False, digits: int = 4) -> Cell:
    """The change from ``base`` to ``lora`` as a signed number, coloured by whether it is a gain."""
    if math.isnan(base) or math.isnan(lora):
        return Cell("n/a", math.nan, "num")
    delta = lora - base
    better = delta < 0 if lower_is_better else delta > 0
    cls = "num " + ("up" if better else "down" if delta != 0 else "")
    return Cell(f"{delta:+.{digits}f}", delta, cls.strip())


# ---------------------------------------------------------------------------------------------------
# Charts


@dataclass(frozen=True)
class Series:
    """One line of a chart: ``points`` are ``(step, value)``; ``fmt`` formats a value for the readout."""

    name: str
    points: list[tuple[float, float]]
    color: str = PALETTE[0]
    dashed: bool = False
    fmt: Callable[[float], str] = field(default=lambda v: f"{v:.4f}")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart) covering ``[low, high]``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        high = low + (abs(low) or 1.0) * 0.1
        low = low - (abs(low) or 1.0) * 0.1
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks, k = [], 0
    while first + k * step <= high + step * 1e-9:
        ticks.append(round(first + k * step, 12))
        k += 1
    if ticks[-1] < high:
        ticks.append(round(first + k * step, 12))
    return ticks


def tick_labels(ticks: list[float]) -> list[str]:
    """Labels for one axis, in one notation: scientific when every tick is tiny or huge, else fixed decimals."""
    if len(ticks) < 2:
        return [f"{t:g}" for t in ticks]
    step = ticks[1] - ticks[0]
    largest = max(abs(t) for t in ticks)
    if largest < 1e-2 or largest >= 1e5:
        return ["0" if t == 0 else f"{t:.1e}" for t in ticks]
    decimals = max(0, -math.floor(math.log10(step)))
    return [f"{t:.{decimals}f}" for t in ticks]


def line_chart(title: str, series: Sequence[Series], x_label: str = "optimizer step", chart_id: str = "") -> str:
    """A line chart as an inline SVG figure with a hover readout of every series at the nearest step.

    The raw points travel in ``data-series`` (so tests can compare them with the files), the readout's
    pre-formatted lines in ``data-hover``. A chart with no points says so instead of drawing axes.
    """
    drawn = [s for s in series if s.points]
    if not drawn:
        return (f'<figure class="chart empty"><figcaption>{esc(title)}</figcaption>'
                '<p class="note">not logged</p></figure>')
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points if math.isfinite(y)]
    x_ticks = nice_ticks(min(xs), max(xs), 6)
    y_ticks = nice_ticks(min(ys), max(ys), 5) if ys else [0.0, 1.0]
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = CHART_W - MARGIN_L - MARGIN_R, CHART_H - MARGIN_T - MARGIN_B

    def px(x: float) -> float:
        return MARGIN_L + (x - x0) / ((x1 - x0) or 1) * plot_w

    def py(y: float) -> float:
        return MARGIN_T + (1 - (y - y0) / ((y1 - y0) or 1)) * plot_h

    parts = [_axes(x_ticks, y_ticks, px, py, x_label)]
    for s in drawn:
        finite = [(x, y) for x, y in s.points if math.isfinite(y)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in finite)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{s.color}" stroke-width="2"{dash}/>')
        if len(finite) <= 60 or s.dashed:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.8" fill="{s.color}"/>' for x, y in finite]

    hover = _hover_points(drawn, px)
    data_series = [{"name": s.name, "points": [[x, y] for x, y in s.points]} for s in drawn]
    legend = "".join(
        f'<span class="key"><span class="swatch{" dashed" if s.dashed else ""}" style="--c:{s.color}"></span>'
        f"{esc(s.name)}</span>"
        for s in drawn
    )
    id_attr = f' id="{esc(chart_id)}"' if chart_id else ""
    return (
        f'<figure class="chart"{id_attr}><figcaption>{esc(title)}</figcaption><div class="legend">{legend}</div>'
        f'<div class="plot"><svg viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{esc(title)}" '
        f"data-series='{esc(json.dumps(data_series))}' data-hover='{esc(json.dumps(hover))}'>"
        + "".join(parts)
        + f'<line class="guide" x1="0" x2="0" y1="{MARGIN_T}" y2="{MARGIN_T + plot_h}" visibility="hidden"/>'
        + '</svg><div class="tip" hidden></div></div></figure>'
    )


def _axes(x_ticks: list[float], y_ticks: list[float], px, py, x_label: str) -> str:
    out = []
    left, right = MARGIN_L, CHART_W - MARGIN_R
    top, bottom = MARGIN_T, CHART_H - MARGIN_B
    for y, label in zip(y_ticks, tick_labels(y_ticks), strict=False):
        out.append(f'<line class="grid" x1="{left}" x2="{right}" y1="{py(y):.1f}" y2="{py(y):.1f}"/>')
        out.append(f'<text class="tick" x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{label}</text>')
    for x, label in zip(x_ticks, tick_labels(x_ticks), strict=False):
        out.append(f'<line class="grid" x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{bottom}"/>')
        out.append(f'<text class="tick" x="{px(x):.1f}" y="{bottom + 16}" text-anchor="middle">{label}</text>')
    out.append(f'<rect class="frame" x="{left}" y="{top}" width="{right - left}" height="{bottom - top}"/>')
    out.append(f'<text class="axis" x="{(left + right) / 2}" y="{CHART_H - 6}" text-anchor="middle">'
               f'{esc(x_label)}</text>')
    return "".join(out)


def _hover_points(series: Sequence[Series], px) -> list[dict]:
    """For every step any series logged: its x in SVG units and the readout lines (one per series there)."""
    steps = sorted({x for s in series for x, _ in s.points})
    values = [dict(s.points) for s in series]
    out = []
    for step in steps:
        lines = [f"step {step:g}"]
        for s, by_step in zip(series, values, strict=False):
            if step in by_step:
                lines.append(f"{s.name}: {s.fmt(by_step[step])}")
        out.append({"x": round(px(step), 1), "lines": lines})
    return out


# ---------------------------------------------------------------------------------------------------
# Images, sections and the page


def png_image(data: bytes, alt: str) -> str:
    """A PNG embedded as a data URI, so the page needs no file beside it."""
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{esc(alt)}">'


def section(title: str, body: str, section_id: str = "") -> str:
    id_attr = f' id="{esc(section_id)}"' if section_id else ""
    return f"<section{id_attr}><h2>{esc(title)}</h2>\n{body}\n</section>"


def paragraph(text: str) -> str:
    return f"<p>{inline_code(text)}</p>"


def details(summary: str, body: str, *, opened: bool = False, details_id: str = "", cls: str = "") -> str:
    """A collapsible block: ``summary`` (HTML) is always shown, ``body`` (HTML) when opened (by a click, or
    from the start with ``opened``). Closed, the body is not laid out: a long list costs one line."""
    attrs = (f' id="{esc(details_id)}"' if details_id else "") + (f' class="{esc(cls)}"' if cls else "")
    return f"<details{attrs}{' open' if opened else ''}><summary>{summary}</summary>\n{body}\n</details>"


def warning_box(title: str, items: Sequence[str], box_id: str = "warnings") -> str:
    """A box that stands out at the top of a page: ``title`` over one list item per warning (text, `code` spans)."""
    lines = "".join(f"<li>{inline_code(item)}</li>" for item in items)
    return f'<div class="warning" role="alert" id="{esc(box_id)}"><strong>{esc(title)}</strong><ul>{lines}</ul></div>'


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    """A whole HTML document: ``sections`` (HTML) under a header, with the CSS and script inline."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # No network: this policy makes the browser refuse any fetch the page might attempt.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n<body>\n"
        f"<header><h1>{esc(title)}</h1><p>{inline_code(subtitle)}</p></header>\n<main>\n"
        + "\n".join(sections)
        + f"\n</main>\n<script>{SCRIPT}</script>\n</body></html>\n"
    )


CSS = """
:root { --fg: #1d2330; --muted: #5f6b7a; --line: #d8dde5; --bg-alt: #f5f7fa; --up: #1a7f37; --down: #c62828; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); }
header { padding: 18px 28px 8px; border-bottom: 1px solid var(--line); }
header h1 { margin: 0 0 4px; font-size: 24px; }
header p { margin: 0; color: var(--muted); }
main { padding: 4px 28px 40px; max-width: 1400px; }
h2 { margin: 28px 0 10px; font-size: 19px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, monospace; background: var(--bg-alt); padding: 0 3px; }
/* A table fits the page: long cells wrap, even inside a long word or URL; one that still cannot fit (many
   runs side by side) scrolls inside its own box, never past the page's edge. */
.table-wrap { overflow-x: auto; max-width: 100%; }
table.data { border-collapse: collapse; margin: 6px 0 12px; }
table.data th, table.data td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top;
  overflow-wrap: break-word; }
table.data th { background: var(--bg-alt); }
table.data th .word { white-space: nowrap; }
table.data th button { all: unset; cursor: pointer; }
table.data th[aria-sort="ascending"] button::after { content: " \\25B2"; }
table.data th[aria-sort="descending"] button::after { content: " \\25BC"; }
table.data th[aria-sort="none"] button::after { content: " \\21C5"; color: var(--muted); }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.up { color: var(--up); font-weight: 600; }
td.down { color: var(--down); font-weight: 600; }
small.up { color: var(--up); }
small.down { color: var(--down); }
table.data td.long { white-space: pre-wrap; overflow-wrap: anywhere; min-width: 9em; font-size: 14px; }
tr.hidden { display: none; }
.filter { margin: 6px 0; }
.filter input { width: 22em; padding: 3px 6px; }
.count, .note { color: var(--muted); }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 14px 24px; }
figure.chart { margin: 0; }
figure.chart figcaption { font-weight: 600; }
.legend { font-size: 13px; color: var(--muted); }
.key { margin-right: 14px; white-space: nowrap; }
.swatch { display: inline-block; width: 18px; height: 0; border-top: 3px solid var(--c); margin: 0 5px 3px 0; }
.swatch.dashed { border-top-style: dashed; }
.plot { position: relative; }
.plot svg { width: 100%; height: auto; display: block; }
.plot .grid { stroke: #eceff3; }
.plot .frame { fill: none; stroke: #9aa4b1; }
.plot .tick, .plot .axis { font-size: 12px; fill: var(--muted); }
.plot .guide { stroke: #6b7480; stroke-dasharray: 3 3; }
.tip { position: absolute; top: 8px; pointer-events: none; background: rgba(255,255,255,.95);
  border: 1px solid var(--line); padding: 4px 8px; font-size: 13px; white-space: pre; box-shadow: 0 1px 3px #0002; }
img { max-width: 100%; height: auto; }
details { margin: 6px 0; }
details > summary { cursor: pointer; font-weight: 600; padding: 3px 0; }
details.prompt { border-left: 3px solid var(--line); padding: 0 0 0 12px; margin: 8px 0; }
details.prompt[open] > summary { margin-bottom: 4px; }
.md { overflow-wrap: anywhere; }
.md h3 { font-size: 17px; margin: 14px 0 6px; }
.md h4, .md h5, .md h6 { font-size: 15px; margin: 12px 0 4px; }
.md p { margin: 6px 0; }
.md blockquote { margin: 4px 0 10px; padding: 4px 12px; border-left: 3px solid #9aa4b1; background: var(--bg-alt); }
.md pre { background: var(--bg-alt); padding: 8px 10px; white-space: pre-wrap; font-size: 13px; }
.md blockquote pre { background: #fff; }
.md pre code { background: none; padding: 0; }
.md ul, .md ol { margin: 6px 0; padding-left: 24px; }
.warning { margin: 18px 0 6px; padding: 10px 14px; border: 2px solid #b26a00; border-left-width: 8px;
  background: #fff4e0; }
.warning ul { margin: 6px 0 0; padding-left: 20px; }
"""

# Hover readout for charts; click-to-sort and text filtering for tables. No library, no network.
SCRIPT = """
document.querySelectorAll('.plot svg[data-hover]').forEach(function (svg) {
  var points = JSON.parse(svg.getAttribute('data-hover'));
  var guide = svg.querySelector('.guide');
  var tip = svg.parentNode.querySelector('.tip');
  svg.addEventListener('mousemove', function (ev) {
    var p = svg.createSVGPoint(); p.x = ev.clientX; p.y = ev.clientY;
    var x = p.matrixTransform(svg.getScreenCTM().inverse()).x;
    var best = points[0];
    points.forEach(function (q) { if (Math.abs(q.x - x) < Math.abs(best.x - x)) best = q; });
    guide.setAttribute('x1', best.x); guide.setAttribute('x2', best.x); guide.setAttribute('visibility', 'visible');
    tip.textContent = best.lines.join('\\n'); tip.hidden = false;
    var scale = svg.getBoundingClientRect().width / svg.viewBox.baseVal.width;
    var left = best.x * scale + 12;
    if (left + tip.offsetWidth > svg.clientWidth) left = best.x * scale - tip.offsetWidth - 12;
    tip.style.left = Math.max(0, left) + 'px';
  });
  svg.addEventListener('mouseleave', function () { guide.setAttribute('visibility', 'hidden'); tip.hidden = true; });
});
function cellValue(row, col) {
  var v = parseFloat(row.cells[col].getAttribute('data-value'));
  return isNaN(v) ? null : v;
}
document.querySelectorAll('table.data th[data-sort]').forEach(function (th) {
  th.querySelector('button').addEventListener('click', function () {
    var table = th.closest('table'), col = +th.getAttribute('data-sort');
    var order = th.getAttribute('aria-sort') === 'descending' ? 'ascending' : 'descending';
    table.querySelectorAll('th[data-sort]').forEach(function (h) { h.setAttribute('aria-sort', 'none'); });
    th.setAttribute('aria-sort', order);
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = cellValue(a, col), y = cellValue(b, col);
      if (x === null || y === null) return (x === null) - (y === null);  // missing values last
      return order === 'ascending' ? x - y : y - x;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
document.querySelectorAll('input[data-filter]').forEach(function (input) {
  var id = input.getAttribute('data-filter'), table = document.getElementById(id);
  var count = document.querySelector('[data-count="' + id + '"]');
  input.addEventListener('input', function () {
    var q = input.value.toLowerCase(), shown = 0, rows = table.tBodies[0].rows;
    for (var i = 0; i < rows.length; i++) {
      var hit = rows[i].textContent.toLowerCase().indexOf(q) !== -1;
      rows[i].classList.toggle('hidden', !hit); if (hit) shown++;
    }
    count.textContent = shown + ' of ' + rows.length + ' rows';
  });
});
"""
