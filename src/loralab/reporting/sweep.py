"""The sweep page: one self-contained HTML document for a grid of runs (loralab sweep). A table of the cells with
each metric (mean ± sd over seeds, or the one run's value with its 95% interval), the best cell by held-out loss
marked, every run's curves overlaid, and each metric against each swept value. Every number is read from the
cells' run directories (RunFiles)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from loralab.reporting import html as web
from loralab.reporting.seeds import mean_sd
from loralab.reporting.tables import interval_text
from loralab.runs.readers import LOWER_IS_BETTER, METRIC_LABELS, RunFiles, curves, format_metric

BEST_BY = "eval_loss"  # the cell marked best: the lowest mean held-out loss of its LoRA runs
METRICS = ("eval_loss", "bleu", "rouge1", "rouge2", "rougeL")  # perplexity is exp(held-out loss): left out


@dataclass(frozen=True)
class SweepCell:
    """One cell of the grid: its label, its (config key, value as typed) settings, and the runs it has so far (one
    per seed; fewer, or none, while the sweep has not reached them)."""

    label: str
    settings: tuple[tuple[str, str], ...]
    runs: tuple[RunFiles, ...]
    seeds: int

    def evaluated(self) -> list[RunFiles]:
        return [r for r in self.runs if r.eval_results]

    def lora_values(self, metric: str) -> list[float]:
        return [r.eval_results[metric]["lora"] for r in self.evaluated() if metric in r.eval_results]

    def changes(self, metric: str) -> list[float]:
        return [r.eval_results[metric]["lora"] - r.eval_results[metric]["base"] for r in self.evaluated()
                if metric in r.eval_results]

    @property
    def done(self) -> bool:
        return len(self.evaluated()) == self.seeds


def best_cell(cells: Sequence[SweepCell]) -> SweepCell | None:
    """The finished cell with the lowest mean LoRA held-out loss, or None while no cell has one."""
    scored = [(mean_sd(c.lora_values(BEST_BY))[0], i) for i, c in enumerate(cells) if c.done and c.lora_values(BEST_BY)]
    return cells[min(scored)[1]] if scored else None


def metric_cell(cell: SweepCell, metric: str) -> web.Cell:
    """The LoRA value (mean ± sd over seeds) over its change from base (mean ± sd, or the one run's 95% interval);
    data-value is the mean LoRA value, what sorting uses and tests read back."""
    values = cell.lora_values(metric)
    if not values:
        return web.Cell("not yet" if not cell.done else "n/a", math.nan, "num")
    mean, sd = mean_sd(values)
    change, change_sd = mean_sd(cell.changes(metric))
    better = change < 0 if metric in LOWER_IS_BETTER else change > 0
    cls = "up" if better else "down" if change else ""
    if len(values) > 1:
        top, bottom = f"{format_metric(mean)} ± {format_metric(sd)}", f"{change:+.4f} ± {change_sd:.4f}"
    else:
        results = cell.evaluated()[0].eval_results[metric]
        interval = f" {interval_text(results)}" if "change_low" in results else ""
        top, bottom = format_metric(mean), f"{change:+.4f}{interval}"
    text = f'{web.esc(top)}<br><small class="{cls}">{web.esc(bottom)}</small>'
    return web.Cell(text, mean, "num", html=True)


def cells_table(cells: Sequence[SweepCell], keys: Sequence[str]) -> str:
    best = best_cell(cells)
    metrics = [m for m in METRICS if any(c.lora_values(m) for c in cells)]
    header = ["Cell", *keys, "Runs", *(METRIC_LABELS.get(m, m) for m in metrics)]
    rows = []
    for i, c in enumerate(cells, 1):
        settings = dict(c.settings)
        rows.append([web.Cell(f"{i} (best)" if c is best else str(i), i, "best" if c is best else ""),
                     *(web.Cell(settings[k]) for k in keys),
                     web.Cell(f"{len(c.evaluated())} of {c.seeds}", len(c.evaluated()), "num"),
                     *(metric_cell(c, m) for m in metrics)])
    return web.table(header, rows, table_id="cells", sortable=(0, *range(len(keys) + 2, len(header))))


def _numeric(texts: Sequence[str]) -> list[float] | None:
    try:
        return [float(t) for t in texts]
    except ValueError:
        return None


def value_charts(cells: Sequence[SweepCell], keys: Sequence[str]) -> list[str]:
    """For each swept key with numeric values: the held-out loss and ROUGE-L (mean over seeds) against it, one line
    per setting of the other keys. Keys with values that are not numbers get a sentence instead."""
    charts = []
    for key in keys:
        texts = list(dict.fromkeys(dict(c.settings)[key] for c in cells))
        if _numeric(texts) is None:
            charts.append(web.paragraph(f"`{key}` takes values that are not numbers: compare its cells in the table."))
            continue
        others = [k for k in keys if k != key]
        groups: dict[tuple, list[SweepCell]] = {}
        for c in cells:
            groups.setdefault(tuple((k, dict(c.settings)[k]) for k in others), []).append(c)
        for metric in ("eval_loss", "rougeL"):
            series = []
            for i, (rest, members) in enumerate(groups.items()):
                points = sorted((float(dict(c.settings)[key]), mean_sd(c.lora_values(metric))[0]) for c in members
                                if c.lora_values(metric))
                name = ", ".join(f"{k}={v}" for k, v in rest) or f"LoRA {METRIC_LABELS.get(metric, metric)}"
                series.append(web.Series(name, points, web.PALETTE[i % len(web.PALETTE)], fmt=format_metric))
            charts.append(web.line_chart(f"{METRIC_LABELS.get(metric, metric)} against {key}", series, x_label=key,
                                         chart_id=f"chart-{metric}-{key.replace('.', '-')}"))
    return charts


def curve_chart(cells: Sequence[SweepCell]) -> str:
    """Every run's training loss (solid) and held-out loss (dashed), one colour per cell (numbered as in the
    table)."""
    series = []
    for i, c in enumerate(cells):
        color = web.PALETTE[i % len(web.PALETTE)]
        for r in c.runs:
            points = curves(r.rows)
            name = f"cell {i + 1}" + (f" seed {r.config.get('train', {}).get('seed', '?')}" if c.seeds > 1 else "")
            series.append(web.Series(f"{name} training", points["loss"], color, fmt=format_metric))
            series.append(web.Series(f"{name} held-out", points["eval_loss"], color, dashed=True, fmt=format_metric))
    return web.line_chart("Loss (held-out dashed), every run", series, chart_id="chart-loss")


def sweep_page(name: str, keys: Sequence[str], cells: Sequence[SweepCell], command: str = "") -> str:
    """The sweep page for ``cells`` over the swept ``keys``, as one self-contained HTML document."""
    best = best_cell(cells)
    finished = sum(c.done for c in cells)
    number = {id(c): i for i, c in enumerate(cells, 1)}
    verdict = (f"Best by held-out loss (LoRA, lowest mean over its runs): cell {number[id(best)]}, "
               f"{', '.join(f'{k}={v}' for k, v in best.settings)}." if best else "No cell has finished yet.")
    folders = web.paragraph(f"Cell run directories: `{name}-<cell>` beside this folder, e.g. `{name}-{cells[0].label}`"
                            + (" (one per seed: `-seed<S>`)." if cells[0].seeds > 1 else "."))
    table_note = ("Each metric cell: LoRA's value over its change from the base model (green where it is a gain). "
                  "Several seeds: mean ± sd over them (sample sd). One seed: the run's value, and its change with the "
                  "change's 95% interval (a paired bootstrap over the held-out prompts). Click a heading to sort.")
    charts = value_charts(cells, keys)
    sections = [
        web.section("Cells", web.paragraph(f"{finished} of {len(cells)} cells finished. {verdict}")
                    + cells_table(cells, keys) + web.paragraph(table_note) + folders, "cells-section"),
        web.section("Training curves", f'<div class="charts">{curve_chart(cells)}</div>', "training"),
        web.section("Metrics against each swept value", f'<div class="charts">{"".join(charts)}</div>', "values"),
    ]
    subtitle = ("Every number on this page is read from the cells' run directories (`eval_results.csv`, "
                "`metrics.jsonl`)." + (f" Made by `{command}`." if command else ""))
    return web.page(f"{name}: sweep over {', '.join(keys)}", subtitle, sections)
