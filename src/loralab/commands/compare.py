"""`loralab compare RUN_DIR RUN_DIR [...] --out FILE.html`: several runs on one self-contained page.

The page shows the config fields that differ between the runs, the metrics with a column per run, the
training curves overlaid, and each held-out prompt's answers from every run side by side. Like the
report, it reads only the run directories' files (through :func:`loralab.runs.readers.read_run`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError
from loralab.files import atomic_write_text
from loralab.reporting import html as web
from loralab.runs.readers import (
    LOWER_IS_BETTER,
    METRIC_LABELS,
    RunFiles,
    curves,
    example_rouge_l,
    format_lr,
    format_metric,
    prompt_text,
    read_run,
)

MISSING = "(not set)"


def run(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Read each run directory, write the comparison page to ``out``, return its path."""
    if len(run_dirs) < 2:
        raise LoralabError("compare needs at least two run directories: "
                           "`loralab compare RUN_DIR RUN_DIR --out FILE.html`")
    out = Path(out)
    if out.is_dir():
        raise LoralabError(f"--out {out} is a directory; give a file name such as {out / 'compare.html'}")
    runs = [read_run(Path(d)) for d in run_dirs]
    atomic_write_text(out, compare_page(runs))
    print(f"compare: {len(runs)} runs -> {out}")
    return out


# ---------------------------------------------------------------------------------------------------
# Pure parts


def run_labels(runs: Sequence[RunFiles]) -> list[str]:
    """One short, distinct label per run: its config name, else its folder name, numbered when two clash."""
    names = [r.name for r in runs]
    return [name if names.count(name) == 1 else f"{name} ({i})" for i, name in enumerate(names, start=1)]


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"section.key": value}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def differing_fields(configs: Sequence[dict]) -> list[tuple[str, list[Any]]]:
    """``(dotted key, value per run)`` for each config field whose value is not the same in every run.

    A field one run lacks counts as differing, with :data:`MISSING` as its value. Keys in first-seen order.
    """
    flat = [flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    rows = []
    for key in keys:
        values = [f.get(key, MISSING) for f in flat]
        if any(v != values[0] for v in values[1:]):
            rows.append((key, values))
    return rows


def _show_value(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return "null" if value is None else str(value)


def metric_rows(runs: Sequence[RunFiles]) -> list[list[web.Cell]]:
    """One row per metric any run has: its label, then per run the LoRA value with its change from that run's base."""
    names = list(dict.fromkeys(name for r in runs for name in (r.eval_results or {})))
    rows = []
    for name in names:
        row = [web.Cell(METRIC_LABELS.get(name, name))]
        for r in runs:
            values = (r.eval_results or {}).get(name)
            if values is None:
                row.append(web.Cell("n/a", math.nan, "num"))
                continue
            base, lora = values["base"], values["lora"]
            change = web.change_cell(base, lora, lower_is_better=name in LOWER_IS_BETTER)
            text = (
                f'{web.esc(format_metric(lora))}<br><small class="{change.cls}">base {web.esc(format_metric(base))}, '
                f"change {web.esc(change.text)}</small>"
            )
            row.append(web.Cell(text, lora, "num", html=True))
        rows.append(row)
    return rows


def prediction_key(prediction: dict) -> tuple[str, str]:
    """What identifies a held-out example across runs made from the same data: its prompt and reference."""
    return prompt_text(prediction), prediction.get("reference", "")


def aligned_predictions(runs: Sequence[RunFiles]) -> list[tuple[dict, list[dict | None]]]:
    """Held-out examples matched across runs, in the first run's order (then the others' new ones):
    ``(an example's record, that example's prediction in each run or None)``.

    Examples match by :func:`prediction_key` and, since a data set can hold the same prompt and reference
    twice, by which occurrence of that key they are.
    """
    order: dict[tuple, dict] = {}
    by_run = []
    for r in runs:
        mapping, seen = {}, {}
        for p in r.predictions or []:
            key = prediction_key(p)
            seen[key] = seen.get(key, 0) + 1
            mapping[(*key, seen[key])] = p
            order.setdefault((*key, seen[key]), p)
        by_run.append(mapping)
    return [(first, [mapping.get(key) for mapping in by_run]) for key, first in order.items()]


def prediction_rows(runs: Sequence[RunFiles]) -> tuple[list[str], list[list[web.Cell]]]:
    """The side-by-side answers table: header and rows, with the last run's ROUGE-L minus the first's."""
    labels = run_labels(runs)
    header = ["#", "Prompt", "Reference", f"Base answer ({labels[0]})"]
    for label in labels:
        header += [f"LoRA answer: {label}", f"ROUGE-L: {label}"]
    header.append(f"ROUGE-L {labels[-1]} minus {labels[0]}")
    rows = []
    for i, (first, per_run) in enumerate(aligned_predictions(runs), start=1):
        row = [
            web.Cell(str(i), i, "num"),
            web.Cell(prompt_text(first), cls="long"),
            web.Cell(first.get("reference", ""), cls="long"),
            web.Cell(per_run[0]["base"] if per_run[0] else MISSING, cls="long"),
        ]
        scores = []
        for p in per_run:
            score = example_rouge_l(p, "lora") if p else math.nan
            scores.append(score)
            row += [web.Cell(p["lora"] if p else MISSING, cls="long"), web.Cell(format_metric(score), score, "num")]
        row.append(web.change_cell(scores[0], scores[-1]))
        rows.append(row)
    return header, rows


def curve_charts(runs: Sequence[RunFiles]) -> str:
    """Loss (training solid, held-out dashed), gradient norm and learning rate, one colour per run."""
    labels = run_labels(runs)
    points = [curves(r.rows) for r in runs]
    colors = [web.PALETTE[i % len(web.PALETTE)] for i in range(len(runs))]
    loss = []
    for label, p, color in zip(labels, points, colors, strict=False):
        loss.append(web.Series(f"{label} training", p["loss"], color, fmt=format_metric))
        loss.append(web.Series(f"{label} held-out", p["eval_loss"], color, dashed=True, fmt=format_metric))
    charts = [
        web.line_chart("Loss (held-out dashed)", loss, chart_id="chart-loss"),
        web.line_chart(
            "Gradient norm",
            [web.Series(label, p["grad_norm"], c, fmt=format_metric)
             for label, p, c in zip(labels, points, colors, strict=False)],
            chart_id="chart-grad-norm",
        ),
        web.line_chart(
            "Learning rate",
            [web.Series(label, p["learning_rate"], c, fmt=format_lr)
             for label, p, c in zip(labels, points, colors, strict=False)],
            chart_id="chart-lr",
        ),
    ]
    return f'<div class="charts">{"".join(charts)}</div>'


def compare_page(runs: Sequence[RunFiles]) -> str:
    """The comparison page for ``runs`` (two or more), as one self-contained HTML document."""
    labels = run_labels(runs)
    listing = web.table(["Run", "Run directory"],
                        [[label, str(r.root)] for label, r in zip(labels, runs, strict=False)], table_id="runs")
    diff = differing_fields([r.config for r in runs])
    if diff:
        config_body = web.table(
            ["Config field", *labels], [[key, *map(_show_value, values)] for key, values in diff],
            table_id="config-diff"
        )
    else:
        config_body = web.paragraph("The runs' `config.yaml` files are identical.")
    metrics = metric_rows(runs)
    metrics_body = (
        web.table(["Metric", *labels], metrics, table_id="metrics")
        + web.paragraph("Each cell: the run's LoRA value, with its own base model's value and the change from it.")
        if metrics
        else web.paragraph("No run has `eval_results.csv` yet; run the eval stage.")
    )
    header, rows = prediction_rows(runs)
    answers = (
        web.paragraph("Held-out prompts matched across runs by prompt and reference. "
                      "Click a heading to sort; type to filter.")
        + web.table(header, rows, table_id="predictions", sortable=(0, *range(5, len(header) - 1, 2), len(header) - 1),
                    filter_label="Filter")
        if rows
        else web.paragraph("No run has `predictions.jsonl` yet; run the eval stage.")
    )
    sections = [
        web.section("Runs", listing, "runs-section"),
        web.section("Config fields that differ", config_body, "config"),
        web.section("Metrics", metrics_body, "results"),
        web.section("Training curves", curve_charts(runs), "training"),
        web.section("Held-out answers side by side", answers, "prompts"),
    ]
    subtitle = ("Every number on this page is read from the runs' files "
                "(`config.yaml`, `metrics.jsonl`, `eval_results.csv`, `predictions.jsonl`).")
    return web.page(f"Comparing {len(runs)} runs: " + ", ".join(labels), subtitle, sections)
