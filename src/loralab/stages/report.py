"""The report stage: turn a run directory into ``report.md`` with a loss curve and a flow diagram.

It reads only the files the other stages wrote into the run directory (through loralab.runs.readers, as compare
and the tests do), so every number in the report can be found in those files. Required: ``config.yaml`` and
``metrics.jsonl``. Optional, each section saying so when absent: ``manifest.json``, ``data/stats.json``,
``eval_results.csv``, ``predictions.jsonl``, ``examples.md``.

:func:`run` is the stage as the CLI calls it; :func:`build_report` does the work from a path alone.

Plots use matplotlib's object API on an Agg canvas, never pyplot, so reporting does not change the
backend or global figure state of the process that calls it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import yaml

from loralab.config import ExperimentConfig
from loralab.errors import LoralabError, first_sentence, hide_library_deprecations
from loralab.files import atomic_write_text
from loralab.reporting.page import report_page
from loralab.reporting.plots import plot_lora_flow, plot_loss_curve
from loralab.reporting.tables import (
    TOO_SHORT,
    format_change,
    format_duration,
    has_intervals,
    interval_text,
    noise_sentence,
    not_yet,
    section,
    setup_rows,
    stage_timing_rows,
    table,
    too_short_lines,
)
from loralab.runs.fingerprints import report_key
from loralab.runs.layout import (
    EVAL_RESULTS_FILE,
    EXAMPLES_FILE,
    FLOW_FILE,
    HTML_REPORT_FILE,
    LOSS_CURVE_FILE,
    MANIFEST_FILE,
    PREDICTIONS_FILE,
    REPORT_FILE,
    RunDir,
)
from loralab.runs.protocol import Stage, StageRecords
from loralab.runs.readers import (
    METRIC_LABELS,
    eval_loss_rows,
    format_lr,
    format_metric,
    read_run,
    summary_row,
    training_rows,
)

# ---------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------
# Formatting: one place, so the report and the tests that check it agree.


# ---------------------------------------------------------------------------------------------------
# The report


@hide_library_deprecations
def run(cfg: ExperimentConfig) -> Path:
    """The report stage: build the report in ``cfg``'s run directory and record the stage; return report.md's path."""
    rundir = RunDir(cfg)
    start = time.perf_counter()
    records = StageRecords(rundir)
    problem = records.report_problem(cfg)  # one source of truth: the report never mixes configs or attempts
    if problem is not None:
        raise LoralabError(f"cannot report on {rundir.root}: {problem}; run `loralab run CONFIG` with this config "
                           f"(or the stage named) first")
    try:
        path = build_report(rundir.root)
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as err:  # a run file damaged after its stage recorded it
        raise LoralabError(f"cannot report on {rundir.root}: {first_sentence(err)}; run the stage that writes "
                           f"that file again with --force") from None
    # Always rebuilt (about a second), from whatever the earlier stages last wrote; the hash records which eval.
    # config.yaml is the stages' that consumed the config; the report only reads it.
    stage = Stage(rundir, report_key(cfg, records.recorded_hash("eval")))
    stage.done(time.perf_counter() - start, write_config=False)
    print(f"report: {path} and {path.with_name(HTML_REPORT_FILE).name}")
    return path


def _too_short_section(config: dict) -> list[str]:
    lines = too_short_lines(config)
    if not lines:
        return []
    return [f"## {TOO_SHORT}\n\nThis run's settings make its numbers weak evidence of what the fine-tune does:\n\n"
            + "\n".join(f"- {line}" for line in lines)]


def build_report(run_dir: Path) -> Path:
    """Write ``loss_curve.png``, ``lora_flow.png``, ``report.md`` and ``report.html`` into ``run_dir`` from
    its files; return report.md's path.

    Raises :class:`loralab.runs.readers.MissingRunFile` (a ``FileNotFoundError``) naming the missing file and the
    stage that writes it when ``config.yaml`` or ``metrics.jsonl`` is absent.
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
            *_too_short_section(run.config),
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


def _flow_info(config: dict, manifest: dict | None, stats: dict | None, eval_results: dict | None) -> dict:
    data, lora = section(config, "data"), section(config, "lora")
    stats = stats or {}
    return {
        "data_path": data.get("path"),
        "source_records": stats.get("source_records"),
        "train_examples": (stats.get("train") or {}).get("examples"),
        "eval_examples": (stats.get("eval") or {}).get("examples"),
        "trained_token_fraction": stats.get("trained_token_fraction"),
        "max_length": data.get("max_length"),
        "model": section(config, "model").get("name_or_path"),
        "r": lora.get("r"),
        "lora_alpha": lora.get("lora_alpha"),
        "target_modules": lora.get("target_modules"),
        "parameters": (manifest or {}).get("parameters"),
        "metrics": eval_results,
    }


def _setup_section(config: dict, manifest: dict | None, stats: dict | None) -> str:
    parts = ["## Setup", table(["Setting", "Value"], setup_rows(config, manifest, stats))]
    timing = stage_timing_rows(manifest)
    if timing:
        parts += ["Wall time per stage:", table(["Stage", "Wall time", "Finished at"], timing)]
    else:
        parts.append(f"Wall time per stage: not recorded (`{MANIFEST_FILE}` has no stages).")
    return "\n\n".join(parts)


def _results_section(eval_results: dict | None, n_predictions: int | None) -> str:
    if eval_results is None:
        return f"## Results\n\n{not_yet(EVAL_RESULTS_FILE)}"
    intervals = has_intervals(eval_results)
    rows = [
        [METRIC_LABELS.get(name, name), format_metric(v["base"]), format_metric(v["lora"]),
         format_change(v["base"], v["lora"]), *([interval_text(v)] if intervals else [])]
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
            table(["Metric", "Base", "LoRA", "Change", *(["95% interval"] if intervals else [])], rows),
            *([noise_sentence(eval_results, n_predictions)] if intervals else []),
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
            facts.append(f"trainer runtime {format_duration(summary['train_runtime'])}")
        parts.append("Summary: " + "; ".join(facts) + ".")

    heldout = eval_loss_rows(rows)
    if heldout:
        parts += [
            "Held-out loss:",
            table(["Step", "Held-out loss"], [[str(r["step"]), format_metric(r["eval_loss"])] for r in heldout]),
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
    parts += ["Training log:", table(["Step", "Epoch", "Loss", "Grad norm", "Learning rate"], log)]
    return "\n\n".join(parts)


def _examples_section(examples: str | None) -> str:
    if examples is None:
        return f"## Examples\n\n{not_yet(EXAMPLES_FILE)}"
    return "## Examples\n\n" + _nest_headings(examples.strip(), top_level=3)


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


