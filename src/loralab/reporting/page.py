"""report.html: a run as one self-contained page, its numbers read from the same files as report.md."""

from __future__ import annotations

import math

from loralab.reporting import html as web
from loralab.reporting.markdown import markdown, markdown_inline
from loralab.reporting.tables import (
    TOO_SHORT,
    has_intervals,
    interval_text,
    noise_sentence,
    not_yet,
    setup_rows,
    stage_timing_rows,
    too_short_lines,
)
from loralab.runs.layout import EVAL_RESULTS_FILE, EXAMPLES_FILE, PREDICTIONS_FILE
from loralab.runs.readers import (
    LOWER_IS_BETTER,
    METRIC_LABELS,
    RunFiles,
    curves,
    example_rouge_l,
    format_lr,
    format_metric,
    prompt_text,
    summary_row,
)

# ---------------------------------------------------------------------------------------------------
# report.html: the same run as one self-contained page, its numbers from the same files

# Long lists fold: the held-out answers table is open up to this many rows (closed above it, one click away),
# and the fixed prompts after the first few are closed, so 16 long answers make a page, not a scroll.
OPEN_PREDICTION_ROWS = 8
OPEN_FIXED_PROMPTS = 3


def metric_cells(name: str, values: dict[str, float]) -> list[web.Cell]:
    """A metrics-table row: label, base, LoRA, change (coloured by whether it is a gain for this metric)."""
    base, lora = values["base"], values["lora"]
    return [
        web.Cell(METRIC_LABELS.get(name, name)),
        web.Cell(format_metric(base), base, "num"),
        web.Cell(format_metric(lora), lora, "num"),
        web.change_cell(base, lora, lower_is_better=name in LOWER_IS_BETTER),
    ]


def win_loss_line(predictions: list[dict]) -> str:
    """How many held-out prompts LoRA's per-example ROUGE-L beat, tied and lost against the base model's."""
    changes = [example_rouge_l(p, "lora") - example_rouge_l(p, "base") for p in predictions]
    changes = [c for c in changes if not math.isnan(c)]
    better, worse = sum(c > 0 for c in changes), sum(c < 0 for c in changes)
    return (
        f"Per-example ROUGE-L: LoRA is higher than the base model on {better} of {len(changes)} held-out prompts, "
        f"lower on {worse}, equal on {len(changes) - better - worse}."
    )


def report_page(run: RunFiles, flow_png: bytes | None) -> str:
    """report.html for ``run``: results with deltas, interactive curves, every held-out answer, the setup."""
    sections = [
        web.section("Results", _html_results(run), "results"),
        web.section("Training", _html_training(run.rows), "training"),
        web.section("Held-out prompts", _html_predictions(run.predictions), "prompts"),
        web.section("Setup", _html_setup(run), "setup"),
    ]
    if flow_png:
        sections.append(web.section("How this run fits together", web.png_image(flow_png, "Data flow of this run"),
                                    "flow"))
    sections.append(web.section("Fixed prompts", _html_examples(run.examples), "examples"))
    subtitle = (
        f"Every number on this page is read from the files of the run directory `{run.root}`: "
        + ", ".join(f"`{name}`" for name in run.sources)
        + "."
    )
    too_short = too_short_lines(run.config)
    if too_short:  # above everything: the numbers below are weak evidence
        sections.insert(0, web.warning_box(f"{TOO_SHORT}: this run's settings make its numbers weak evidence",
                                           too_short, "too-short"))
    return web.page(f"{run.name}: LoRA fine-tuning report", subtitle, sections)


def _html_results(run: RunFiles) -> str:
    if run.eval_results is None:
        return web.paragraph(not_yet(EVAL_RESULTS_FILE).strip("_"))
    intervals = has_intervals(run.eval_results)
    rows = [metric_cells(name, values) + ([web.Cell(interval_text(values), values.get("change_low"), "num")]
                                          if intervals else [])
            for name, values in run.eval_results.items()]
    parts = [
        web.paragraph(
            "BLEU is corpus BLEU (sacrebleu), ROUGE the mean F1 over held-out prompts (rouge-score); "
            "both on a 0-1 scale. "
            "Change is LoRA minus base; green where it is a gain."
        ),
        web.table(["Metric", "Base", "LoRA", "Change", *(["95% interval"] if intervals else [])], rows,
                  table_id="metrics"),
    ]
    if intervals:
        parts.append(web.paragraph(noise_sentence(run.eval_results, len(run.predictions or []) or None)))
    if run.predictions:
        parts.append(web.paragraph(win_loss_line(run.predictions)))
    parts.append(
        web.paragraph(
            "BLEU and ROUGE reward n-gram overlap with a single reference answer. They do not measure whether an "
            "answer is correct or helpful, and they score a correct paraphrase low: "
            "read them next to the answers below."
        )
    )
    return "\n".join(parts)


def _html_training(rows: list[dict]) -> str:
    points = curves(rows)
    if not points["loss"]:
        return web.paragraph("No training rows were logged (is `logging_steps` larger than the number of steps?).")
    charts = [
        web.line_chart(
            "Loss",
            [
                web.Series("training loss", points["loss"], web.PALETTE[0], fmt=format_metric),
                web.Series("held-out loss", points["eval_loss"], web.PALETTE[1], dashed=True, fmt=format_metric),
            ],
            chart_id="chart-loss",
        ),
        web.line_chart("Gradient norm",
                       [web.Series("grad norm", points["grad_norm"], web.PALETTE[2], fmt=format_metric)],
                       chart_id="chart-grad-norm"),
        web.line_chart("Learning rate",
                       [web.Series("learning rate", points["learning_rate"], web.PALETTE[3], fmt=format_lr)],
                       chart_id="chart-lr"),
    ]
    parts = [web.paragraph("Hover over a chart to read the values at each logged step."),
             f'<div class="charts">{"".join(charts)}</div>']
    summary = summary_row(rows)
    if summary and "train_loss" in summary:
        parts.append(web.paragraph(f"Mean training loss over the run: {format_metric(summary['train_loss'])}."))
    return "\n".join(parts)


def _html_predictions(predictions: list[dict] | None) -> str:
    if predictions is None:
        return web.paragraph(not_yet(PREDICTIONS_FILE).strip("_"))
    rows = []
    for i, p in enumerate(predictions, start=1):
        base, lora = example_rouge_l(p, "base"), example_rouge_l(p, "lora")
        rows.append(
            [
                web.Cell(str(i), i, "num"),
                web.Cell(prompt_text(p), cls="long"),
                web.Cell(p.get("reference", ""), cls="long"),
                web.Cell(p.get("base", ""), cls="long"),
                web.Cell(p.get("lora", ""), cls="long"),
                web.Cell(format_metric(base), base, "num"),
                web.Cell(format_metric(lora), lora, "num"),
                web.change_cell(base, lora),
            ]
        )
    header = ["#", "Prompt", "Reference", "Base answer", "LoRA answer", "ROUGE-L base", "ROUGE-L LoRA", "Change"]
    intro = web.paragraph(
        f"The {len(rows)} held-out prompts of `{PREDICTIONS_FILE}`, "
        "answered greedily by the base model and by base + LoRA. "
        "Click a column heading to sort (Change: where LoRA helped most, or hurt most); type to filter."
    )
    table = web.table(header, rows, table_id="predictions", sortable=(0, 5, 6, 7), filter_label="Filter")
    summary = f"All {len(rows)} held-out prompts: prompt, reference, both answers, per-example ROUGE-L"
    return intro + "\n" + web.details(web.esc(summary), table, opened=len(rows) <= OPEN_PREDICTION_ROWS,
                                      details_id="predictions-details")


def split_examples(text: str) -> tuple[str, list[tuple[str, str]]]:
    """examples.md cut at its second-level headings (one per fixed prompt, as the eval stage writes it):
    the text before the first, and each heading's text with the Markdown under it. A ``## `` line inside a
    fenced code block is code, not a heading; the answers are quoted (``> ``), so theirs never start a line."""
    preamble, prompts, fence = [], [], ""
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        if fence:
            fence = "" if stripped.startswith(fence) and not stripped.strip(fence[0]).strip() else fence
        elif stripped[:3] in ("```", "~~~"):
            fence = stripped[: len(stripped) - len(stripped.lstrip(stripped[0]))]
        elif line.startswith("## "):
            prompts.append((line[3:].strip(), []))
            continue
        (prompts[-1][1] if prompts else preamble).append(line)
    return "\n".join(preamble), [(title, "\n".join(body)) for title, body in prompts]


def _html_examples(examples: str | None) -> str:
    """examples.md rendered (its text is model output: escaped, only Markdown's structure becomes markup),
    each fixed prompt a collapsible block, the first few open."""
    if examples is None:
        return f'<div class="md">{markdown(not_yet(EXAMPLES_FILE))}</div>'
    preamble, prompts = split_examples(examples.strip())
    parts = [markdown(preamble, heading_offset=2)]
    if len(prompts) > OPEN_FIXED_PROMPTS:
        parts.append(f"<p>The first {OPEN_FIXED_PROMPTS} of {len(prompts)} prompts are open; "
                     "click a prompt to show or hide its answers.</p>")
    parts += [web.details(markdown_inline(title), markdown(body, heading_offset=2),
                          opened=i < OPEN_FIXED_PROMPTS, cls="prompt")
              for i, (title, body) in enumerate(prompts)]
    return '<div class="md">' + "\n".join(parts) + "</div>"


def _html_setup(run: RunFiles) -> str:
    rows = [[web.Cell(k), web.Cell(web.inline_code(v), html=True)]
            for k, v in setup_rows(run.config, run.manifest, run.stats)]
    parts = [web.table(["Setting", "Value"], rows, table_id="setup")]
    timing = stage_timing_rows(run.manifest)
    if timing:
        parts += ["<p>Wall time per stage:</p>",
                  web.table(["Stage", "Wall time", "Finished at"], timing, table_id="stages")]
    return "\n".join(parts)
