"""The report stage: turn a run directory into ``report.md`` with a loss curve and a flow diagram.

It reads only the files the other stages wrote into the run directory (through loralab.runfiles, as compare
and the tests do), so every number in the report can be found in those files. Required: ``config.yaml`` and
``metrics.jsonl``. Optional, each section saying so when absent: ``manifest.json``, ``data/stats.json``, ``eval_results.csv``, ``predictions.jsonl``, ``examples.md``.

:func:`run` is the stage as the CLI calls it; :func:`build_report` does the work from a path alone.

Plots use matplotlib's object API on an Agg canvas, never pyplot, so reporting does not change the
backend or global figure state of the process that calls it.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from matplotlib.ticker import MaxNLocator

from loralab.config import ExperimentConfig
from loralab import report_html as web
from loralab.errors import LoralabError
from loralab.rundir import (
    EVAL_RESULTS_FILE,
    EXAMPLES_FILE,
    FLOW_FILE,
    HTML_REPORT_FILE,
    LOSS_CURVE_FILE,
    MANIFEST_FILE,
    PREDICTIONS_FILE,
    REPORT_FILE,
    STATS_FILE,
    RunDir,
    atomic_write_bytes,
    atomic_write_text,
    stage_hash,
)
from loralab.runfiles import (
    LOWER_IS_BETTER,
    METRIC_LABELS,
    STAGE_ORDER,
    RunFiles,
    summary_row,
    curves,
    eval_loss_rows,
    example_rouge_l,
    format_lr,
    format_metric,
    prompt_text,
    read_run,
    training_rows,
)


# ---------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------
# Formatting: one place, so the report and the tests that check it agree.


def _format_change(base: float, lora: float) -> str:
    return "n/a" if math.isnan(base) or math.isnan(lora) else f"{lora - base:+.4f}"


def _format_count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _format_targets(targets: Any) -> str:
    if targets is None:
        return "n/a"
    return targets if isinstance(targets, str) else ", ".join(map(str, targets))


def _format_parameters(params: dict | None) -> str:
    if not params or not {"trainable", "total", "trainable_percent"} <= params.keys():
        return "n/a"
    return f"{params['trainable']:,} of {params['total']:,} ({params['trainable_percent']:.2f}%)"


def _show(value: Any) -> str:
    return "n/a" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


# ---------------------------------------------------------------------------------------------------
# Figures


def plot_loss_curve(rows: list[dict], path: Path) -> None:
    """Plot training loss, gradient norm and learning rate against step, stacked, into a PNG at ``path``.

    ``rows`` are ``metrics.jsonl`` rows as :func:`read_metrics` returns them; rows with ``eval_loss``
    are drawn as held-out points on the loss panel, other kinds of rows are ignored. Raises
    ``ValueError`` when there is no training row to plot.
    """
    train = training_rows(rows)
    if not train:
        raise ValueError("no training rows (with 'step' and 'loss') to plot")
    heldout = eval_loss_rows(rows)

    fig = Figure(figsize=(7.5, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, grad_ax, lr_ax = fig.subplots(3, 1, sharex=True)
    # Markers help read a short run; on a long one they only hide the line.
    marker = "o" if len(train) <= 50 else None

    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], marker=marker, ms=3, label="training loss")
    if heldout:
        loss_ax.plot(
            [r["step"] for r in heldout], [r["eval_loss"] for r in heldout], "s--", color="C1", ms=5, label="held-out loss"
        )
    loss_ax.legend(loc="upper right")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    _plot_series(grad_ax, train, "grad_norm", "grad norm", "C2", marker)
    _plot_series(lr_ax, train, "learning_rate", "learning rate", "C3", marker)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_ax.set_xlabel("optimizer step")
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Training")
    _save_figure(fig, path)


def _plot_series(ax, rows: list[dict], key: str, ylabel: str, color: str, marker: str | None) -> None:
    """Draw ``key`` against step from the rows that logged it; say so on the panel when none did."""
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker=marker, ms=3, color=color)
    else:
        ax.text(0.5, 0.5, f"{key} not logged", transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_lora_flow(info: dict, path: Path) -> None:
    """Draw the run as a flow diagram, data → chat template and masking → LoRA on the frozen base → evaluation.

    ``info`` carries the run's values; a missing key prints as ``n/a``: ``data_path``, ``source_records``,
    ``train_examples``, ``eval_examples``, ``trained_token_fraction`` (0-1), ``max_length``, ``model``,
    ``r``, ``lora_alpha``, ``target_modules``, ``parameters`` (manifest's ``{trainable, total,
    trainable_percent}``) and ``metrics`` (``{name: {"base": x, "lora": y}}``; absent or ``None`` before
    the eval stage has run).
    """
    fraction = info.get("trained_token_fraction")
    params = info.get("parameters")
    metrics = info.get("metrics")
    # (title, fill colour, body lines, stage that leads from this box to the next)
    boxes = [
        (
            "Raw data",
            "#e8f0fe",
            [
                *_wrap(_show(info.get("data_path"))),
                f"{_format_count(info.get('source_records'))} source records",
                f"{_format_count(info.get('train_examples'))} train / {_format_count(info.get('eval_examples'))} held-out",
            ],
            "prepare",
        ),
        (
            "Chat template + masking",
            "#fef7e0",
            [
                "prompt and answer in the",
                "model's chat template,",
                f"at most {_show(info.get('max_length'))} tokens;",
                "prompt tokens masked, loss",
                "on answer tokens only:",
                f"{'n/a' if fraction is None else f'{fraction:.1%}'} of tokens trained",
            ],
            "train",
        ),
        (
            "LoRA adapters",
            "#e6f4ea",
            [
                f"r = {_show(info.get('r'))}, alpha = {_show(info.get('lora_alpha'))}",
                *_wrap("on " + _format_targets(info.get("target_modules"))),
                "trainable parameters:",
                *_wrap(_format_parameters(params)),
            ],
            "eval",
        ),
        ("Evaluation", "#fce8e6", _metric_lines(metrics), None),
    ]

    # Drawn in inches: axes limits equal the figure size, so text and boxes keep their proportions.
    width, gap, bottom, top = 2.9, 0.8, 0.1, 3.2
    fig_w, fig_h = 4 * width + 3 * gap + 0.2, top + 0.1
    fig = Figure(figsize=(fig_w, fig_h))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, fig_w)
    ax.set_ylim(0, fig_h)
    ax.axis("off")

    middle = (top + bottom) / 2
    for i, (title, color, lines, stage) in enumerate(boxes):
        x = 0.1 + i * (width + gap)
        _box(ax, x, bottom, width, top - bottom, color)
        ax.text(x + width / 2, top - 0.15, title, ha="center", va="top", fontsize=11, weight="bold")
        ax.text(x + 0.15, top - 0.55, "\n".join(lines), ha="left", va="top", fontsize=9, linespacing=1.45)
        if title == "LoRA adapters":
            # The adapters ride on the base model, whose weights stay frozen: drawn as a box inside.
            _box(ax, x + 0.15, bottom + 0.15, width - 0.3, 0.8, "#dddddd")
            base_lines = ["frozen base model", *_wrap(_show(info.get("model")), 38)]
            ax.text(
                x + width / 2, bottom + 0.85, "\n".join(base_lines), ha="center", va="top", fontsize=8.5, linespacing=1.35
            )
        if stage:
            start, end = (x + width + 0.08, middle), (x + width + gap - 0.08, middle)
            ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=20))
            ax.text(x + width + gap / 2, middle + 0.1, stage, ha="center", va="bottom", fontsize=8.5, style="italic")
    _save_figure(fig, path)


def _metric_lines(metrics: dict | None) -> list[str]:
    if not metrics:
        return ["not run yet"]
    lines = ["base → LoRA"]
    for name, values in metrics.items():
        label = METRIC_LABELS.get(name, name).split(" (")[0]
        lines.append(f"{label}: {format_metric(values['base'])} → {format_metric(values['lora'])}")
    return lines


def _wrap(text: str, width: int = 34) -> list[str]:
    return textwrap.wrap(text, width) or [""]


def _box(ax, x: float, y: float, width: float, height: float, color: str) -> None:
    ax.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0,rounding_size=0.12", fc=color, ec="0.3"))


def _save_figure(fig: Figure, path: Path) -> None:
    # Rendered in memory first, so a failed render never replaces a good image with half a file.
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(Path(path), buffer.getvalue())


# ---------------------------------------------------------------------------------------------------
# The report


def run(cfg: ExperimentConfig) -> Path:
    """The report stage: build the report in ``cfg``'s run directory and record the stage; return report.md's path."""
    rundir = RunDir(cfg)
    start = time.perf_counter()
    problem = rundir.report_problem(cfg)  # one source of truth: the report never mixes configs or attempts
    if problem is not None:
        raise LoralabError(f"cannot report on {rundir.root}: {problem}; run `loralab run CONFIG` with this config "
                           f"(or the stage named) first")
    try:
        path = build_report(rundir.root)
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as err:  # a run file damaged after its stage recorded it
        raise LoralabError(f"cannot report on {rundir.root}: {str(err).splitlines()[0]}; run the stage that writes "
                           f"that file again with --force") from None
    # Always rebuilt (about a second), from whatever the earlier stages last wrote; the hash records which eval.
    # config.yaml is the stages' that consumed the config; the report only reads it.
    rundir.mark_done("report", stage_hash(cfg, "report", rundir.recorded_hash("eval")), time.perf_counter() - start,
                     write_config=False)
    print(f"report: {path} and {path.with_name(HTML_REPORT_FILE).name}")
    return path


def build_report(run_dir: Path) -> Path:
    """Write ``loss_curve.png``, ``lora_flow.png``, ``report.md`` and ``report.html`` into ``run_dir`` from
    its files; return report.md's path.

    Raises :class:`loralab.runfiles.MissingRunFile` (a ``FileNotFoundError``) naming the missing file and the stage that
    writes it when ``config.yaml`` or ``metrics.jsonl`` is absent.
    """
    run = read_run(run_dir)
    run_dir = run.root
    # A run shorter than logging_steps logs no training row: nothing to plot, and the report says so.
    if training_rows(run.rows):
        plot_loss_curve(run.rows, run_dir / LOSS_CURVE_FILE)
    plot_lora_flow(_flow_info(run.config, run.manifest, run.stats, run.eval_results), run_dir / FLOW_FILE)

    text = "\n\n".join(
        [
            f"# {run.name}: LoRA fine-tuning report",
            "Every number below is read from the files of this run directory: "
            + ", ".join(f"`{name}`" for name in run.sources)
            + ".",
            _setup_section(run.config, run.manifest, run.stats),
            _results_section(run.eval_results, len(run.predictions) if run.predictions is not None else None),
            _training_section(run.rows),
            f"## How this run fits together\n\n![Data flow of this run]({FLOW_FILE})",
            _examples_section(run.examples),
        ]
    )
    report_path = run_dir / REPORT_FILE
    atomic_write_text(report_path, text + "\n")
    atomic_write_text(run_dir / HTML_REPORT_FILE, report_page(run, (run_dir / FLOW_FILE).read_bytes()))
    return report_path


def _section(config: dict, name: str) -> dict:
    return config.get(name) or {}


def _flow_info(config: dict, manifest: dict | None, stats: dict | None, eval_results: dict | None) -> dict:
    data, lora = _section(config, "data"), _section(config, "lora")
    stats = stats or {}
    return {
        "data_path": data.get("path"),
        "source_records": stats.get("source_records"),
        "train_examples": (stats.get("train") or {}).get("examples"),
        "eval_examples": (stats.get("eval") or {}).get("examples"),
        "trained_token_fraction": stats.get("trained_token_fraction"),
        "max_length": data.get("max_length"),
        "model": _section(config, "model").get("name_or_path"),
        "r": lora.get("r"),
        "lora_alpha": lora.get("lora_alpha"),
        "target_modules": lora.get("target_modules"),
        "parameters": (manifest or {}).get("parameters"),
        "metrics": eval_results,
    }


def setup_rows(config: dict, manifest: dict | None, stats: dict | None) -> list[list[str]]:
    """The setup table's ``[setting, value]`` rows, values in Markdown (`code` spans); shared by report.md and report.html."""
    model, data, lora, train = (_section(config, name) for name in ("model", "data", "lora", "train"))
    manifest = manifest or {}

    if stats:
        tr, ev = stats.get("train", {}), stats.get("eval", {})
        examples = (
            f"{_format_count(tr.get('examples'))} train / {_format_count(ev.get('examples'))} held-out "
            f"(selected {_format_count(stats.get('selected'))} of {_format_count(stats.get('source_records'))} "
            f"source records; {_format_count(stats.get('truncated'))} truncated, "
            f"{_format_count(stats.get('dropped'))} dropped)"
        )
        fraction = stats.get("trained_token_fraction")
        # prepare computes the share over train and held-out tokens together, so it is labelled as such.
        tokens = (
            f"{_format_count(tr.get('trained_tokens'))} of {_format_count(tr.get('tokens'))} train tokens carry loss "
            f"(prompts masked); trained-token share over both splits "
            f"{'n/a' if fraction is None else f'{fraction:.1%}'}"
        )
    else:
        examples = tokens = f"not recorded (`{STATS_FILE}` is missing)"
    template = (stats or {}).get("template") or data.get("template")

    batch, accumulation = train.get("per_device_train_batch_size"), train.get("gradient_accumulation_steps")
    per_step = batch * accumulation if batch is not None and accumulation is not None else None
    device = manifest.get("device")
    if device and manifest.get("device_name"):
        device = f"{device} ({manifest['device_name']})"
    seeds = manifest.get("seeds")
    data_hash = manifest.get("data_sha256")

    return [
        ["Base model (frozen)", f"`{_show(model.get('name_or_path'))}`"],
        ["Data", f"`{_show(data.get('path'))}`" + (f" (sha256 `{data_hash[:12]}`)" if data_hash else "")],
        ["Examples", examples],
        ["Tokens", tokens],
        ["Prompt format", f"{_show(template)} template, at most {_show(data.get('max_length'))} tokens"],
        [
            "LoRA",
            f"r = {_show(lora.get('r'))}, alpha = {_show(lora.get('lora_alpha'))}, "
            f"dropout = {_show(lora.get('lora_dropout'))}",
        ],
        ["Target modules", _format_targets(lora.get("target_modules"))],
        ["Trainable parameters", _format_parameters(manifest.get("parameters"))],
        [
            "Batch",
            f"{_show(batch)} x {_show(accumulation)} accumulation = {_show(per_step)} examples per optimizer step",
        ],
        ["Steps", _show(train.get("max_steps"))],
        [
            "Learning rate",
            f"{format_lr(train.get('learning_rate'))}, {_show(train.get('lr_scheduler_type'))} schedule, "
            f"warmup {_show(train.get('warmup_steps'))} steps",
        ],
        ["Seeds", ", ".join(f"{k} {v}" for k, v in seeds.items()) if seeds else _show(train.get("seed"))],
        ["Device", _show(device)],
        # The manifest records the precision actually used, which can differ from the one asked for.
        ["Precision", _show(manifest.get("precision") or train.get("precision"))],
        ["loralab", f"{_show(manifest.get('loralab_version'))}, commit `{_show(manifest.get('git_commit'))}`"],
    ]


def stage_timing_rows(manifest: dict | None) -> list[list[str]]:
    """``[stage, wall time, finished at]`` per recorded stage, in pipeline order; empty when none is recorded."""
    # The report stage is left out: its entry, if any, is from an earlier report, not this one.
    stages = {k: v for k, v in ((manifest or {}).get("stages") or {}).items() if k != "report"}
    ordered = sorted(stages, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
    return [
        [
            stage,
            _format_duration(stages[stage]["wall_s"]) if "wall_s" in stages[stage] else "n/a",
            _show(stages[stage].get("finished_at")),
        ]
        for stage in ordered
    ]


def _setup_section(config: dict, manifest: dict | None, stats: dict | None) -> str:
    parts = ["## Setup", _table(["Setting", "Value"], setup_rows(config, manifest, stats))]
    timing = stage_timing_rows(manifest)
    if timing:
        parts += ["Wall time per stage:", _table(["Stage", "Wall time", "Finished at"], timing)]
    else:
        parts.append(f"Wall time per stage: not recorded (`{MANIFEST_FILE}` has no stages).")
    return "\n\n".join(parts)


def _results_section(eval_results: dict | None, n_predictions: int | None) -> str:
    if eval_results is None:
        return f"## Results\n\n{_not_yet(EVAL_RESULTS_FILE)}"
    rows = [
        [METRIC_LABELS.get(name, name), format_metric(v["base"]), format_metric(v["lora"]), _format_change(v["base"], v["lora"])]
        for name, v in eval_results.items()
    ]
    scope = (
        f"Base model and LoRA model answered the same {n_predictions:,} held-out prompts (`{PREDICTIONS_FILE}`). "
        if n_predictions
        else ""
    )
    return "\n\n".join(
        [
            "## Results",
            scope + "BLEU is corpus BLEU (sacrebleu), ROUGE the mean F1 over prompts; both on a 0-1 scale.",
            _table(["Metric", "Base", "LoRA", "Change"], rows),
            "BLEU and ROUGE reward n-gram overlap with a single reference answer. They do not measure whether "
            "an answer is correct or helpful, and they score a correct paraphrase low, so read them next to "
            "the examples below.",
        ]
    )


def _training_section(rows: list[dict]) -> str:
    train = training_rows(rows)
    if not train:
        return "## Training\n\n_No training rows were logged (is `logging_steps` larger than the number of steps?)._"
    parts = ["## Training", f"![Training loss, gradient norm and learning rate]({LOSS_CURVE_FILE})"]

    summary = summary_row(rows)
    if summary:
        facts = []
        if "train_loss" in summary:
            facts.append(f"mean training loss over the run {format_metric(summary['train_loss'])}")
        if "train_runtime" in summary:
            facts.append(f"trainer runtime {_format_duration(summary['train_runtime'])}")
        parts.append("Summary: " + "; ".join(facts) + ".")

    heldout = eval_loss_rows(rows)
    if heldout:
        parts += [
            "Held-out loss:",
            _table(["Step", "Held-out loss"], [[str(r["step"]), format_metric(r["eval_loss"])] for r in heldout]),
        ]

    log = [
        [
            str(r["step"]),
            "n/a" if r.get("epoch") is None else f"{r['epoch']:.2f}",
            format_metric(r["loss"]),
            format_metric(r.get("grad_norm")),
            format_lr(r.get("learning_rate")),
        ]
        for r in train
    ]
    parts += ["Training log:", _table(["Step", "Epoch", "Loss", "Grad norm", "Learning rate"], log)]
    return "\n\n".join(parts)


def _examples_section(examples: str | None) -> str:
    if examples is None:
        return f"## Examples\n\n{_not_yet(EXAMPLES_FILE)}"
    return "## Examples\n\n" + _nest_headings(examples.strip(), top_level=3)


def _not_yet(name: str) -> str:
    return f"_Not available yet: `{name}` is missing. Run the eval stage (`loralab eval CONFIG`), then the report again._"


def _nest_headings(markdown: str, top_level: int) -> str:
    """Shift the headings of ``markdown`` so its highest one sits at ``top_level`` (fenced code is left alone)."""
    heading = re.compile(r"^(#{1,6})\s")
    lines = markdown.splitlines()
    levels, in_fence = {}, False  # line index -> heading level, for headings outside fenced code
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        elif not in_fence and (m := heading.match(line)):
            levels[i] = len(m.group(1))
    shift = top_level - min(levels.values(), default=top_level)
    if shift <= 0:
        return markdown
    for i, level in levels.items():
        lines[i] = "#" * min(level + shift, 6) + lines[i][level:]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# report.html: the same run as one self-contained page, its numbers from the same files


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
        sections.append(web.section("How this run fits together", web.png_image(flow_png, "Data flow of this run"), "flow"))
    examples = _not_yet(EXAMPLES_FILE) if run.examples is None else run.examples.strip()
    sections.append(web.section("Fixed prompts", f'<pre class="md">{web.esc(examples)}</pre>', "examples"))
    subtitle = (
        f"Every number on this page is read from the files of the run directory `{run.root}`: "
        + ", ".join(f"`{name}`" for name in run.sources)
        + "."
    )
    return web.page(f"{run.name}: LoRA fine-tuning report", subtitle, sections)


def _html_results(run: RunFiles) -> str:
    if run.eval_results is None:
        return web.paragraph(_not_yet(EVAL_RESULTS_FILE).strip("_"))
    rows = [metric_cells(name, values) for name, values in run.eval_results.items()]
    parts = [
        web.paragraph(
            "BLEU is corpus BLEU (sacrebleu), ROUGE the mean F1 over held-out prompts (rouge-score); both on a 0-1 scale. "
            "Change is LoRA minus base; green where it is a gain."
        ),
        web.table(["Metric", "Base", "LoRA", "Change"], rows, table_id="metrics"),
    ]
    if run.predictions:
        parts.append(web.paragraph(win_loss_line(run.predictions)))
    parts.append(
        web.paragraph(
            "BLEU and ROUGE reward n-gram overlap with a single reference answer. They do not measure whether an "
            "answer is correct or helpful, and they score a correct paraphrase low: read them next to the answers below."
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
        web.line_chart("Gradient norm", [web.Series("grad norm", points["grad_norm"], web.PALETTE[2], fmt=format_metric)],
                       chart_id="chart-grad-norm"),
        web.line_chart("Learning rate", [web.Series("learning rate", points["learning_rate"], web.PALETTE[3], fmt=format_lr)],
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
        return web.paragraph(_not_yet(PREDICTIONS_FILE).strip("_"))
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
        f"The {len(rows)} held-out prompts of `{PREDICTIONS_FILE}`, answered greedily by the base model and by base + LoRA. "
        "Click a column heading to sort (Change: where LoRA helped most, or hurt most); type to filter."
    )
    return intro + "\n" + web.table(header, rows, table_id="predictions", sortable=(0, 5, 6, 7), filter_label="Filter")


def _html_setup(run: RunFiles) -> str:
    rows = [[web.Cell(k), web.Cell(web.inline_code(v), html=True)] for k, v in setup_rows(run.config, run.manifest, run.stats)]
    parts = [web.table(["Setting", "Value"], rows, table_id="setup")]
    timing = stage_timing_rows(run.manifest)
    if timing:
        parts += ["<p>Wall time per stage:</p>", web.table(["Stage", "Wall time", "Finished at"], timing, table_id="stages")]
    return "\n".join(parts)
