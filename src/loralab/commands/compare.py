"""`loralab compare RUN_DIR RUN_DIR [...] --out FILE.html`: several runs on one self-contained page.

The page shows the config fields that differ between the runs, the metrics with a column per run, the
training curves overlaid, and each held-out prompt's answers from every run side by side. Like the
report, it reads only the run directories' files (through :func:`loralab.runs.readers.read_run`).

When the runs differ in data, held-out set, eval settings or model, some of their metrics are not comparable:
each such difference is a warning on stderr and in a box at the top of the page, naming those metrics.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError
from loralab.files import atomic_write_text
from loralab.reporting import html as web
from loralab.reporting.tables import interval_text, noise_sentence
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
    for warning in comparability_warnings(runs):
        print(f"loralab compare: warning: {warning}", file=sys.stderr)
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


# ---------------------------------------------------------------------------------------------------
# Comparability: what makes metrics of two runs not comparable, and which ones

EVERY_METRIC = "BLEU, ROUGE, the held-out loss and perplexity are not comparable between them, base or LoRA"


@dataclass(frozen=True)
class Mismatch:
    """One way the runs differ that leaves some of their metrics not comparable: ``what`` differs, how it reads
    in each run (``values``, in run order), and which metrics are then not comparable (``consequence``)."""

    what: str
    values: list[str]
    consequence: str

    def text(self, labels: Sequence[str]) -> str:
        separator = "; " if any(", " in value for value in self.values) else ", "
        shown = separator.join(f"{label}: {value}" for label, value in zip(labels, self.values, strict=True))
        return f"runs differ in {self.what} ({shown}): {self.consequence}"


def _get(config: dict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _differ(keys: Sequence[Any]) -> bool:
    return any(key != keys[0] for key in keys[1:])


def _short(value: Any, width: int = 12) -> str:
    text = str(value)
    return text if len(text) <= width + 2 else text[:width] + ".."


def data_mismatch(runs: Sequence[RunFiles]) -> Mismatch | None:
    """The runs' data files or formats differ. Files compare by the sha256 the prepare stage recorded when every
    run has one (the same file under two paths is the same data), else by data.path and data.split; formats
    only where known (a run that neither recorded nor set one read the same file the same way)."""
    manifests = [r.manifest or {} for r in runs]
    paths = [_show_value(_get(r.config, "data.path")) for r in runs]
    splits = [_get(r.config, "data.split") for r in runs]
    hashes = [m.get("data_sha256") for m in manifests]
    files = hashes if all(hashes) else list(zip(paths, splits, strict=True))
    # The format each run read its records as: the one prepare detected, else an explicit data.format.
    formats = [m.get("data_format") or _get(r.config, "data.format") for m, r in zip(manifests, runs, strict=True)]
    known = [fmt for fmt in formats if fmt not in (None, "auto")]
    if not _differ(files) and not _differ(known):
        return None
    values = []
    for path, split, digest, fmt in zip(paths, splits, hashes, formats, strict=True):
        text = path + (f" split {split}" if _differ(splits) else "")
        if digest and not str(digest).startswith("hub:"):
            text += f" sha256 {_short(digest)}"
        values.append(text + (f", format {fmt}" if _differ(known) else ""))
    return Mismatch("data", values, EVERY_METRIC)


def heldout_key(prediction: dict) -> tuple[str, str, str]:
    """What identifies a held-out example whatever the model: its instruction, input and reference. The rendered
    prompt is left out: each model's chat template renders the same record differently."""
    return (prediction.get("instruction") or "", prediction.get("input") or "", prediction.get("reference") or "")


HELDOUT_SETTINGS = ("data.seed", "data.num_examples", "data.eval_size", "eval.num_examples")


def heldout_mismatch(runs: Sequence[RunFiles], labels: Sequence[str]) -> Mismatch | None:
    """The runs were scored on different held-out examples: by their predictions when every run has them, else
    by the settings that draw the held-out split from the data (seed, sizes)."""
    if all(r.predictions for r in runs):
        sets = [Counter(heldout_key(p) for p in r.predictions or []) for r in runs]
        if not _differ(sets):
            return None
        values = [f"{sets[0].total()} held-out prompts"]
        values += [f"{s.total()} held-out prompts, {(s & sets[0]).total()} of them also in {labels[0]}"
                   for s in sets[1:]]
        return Mismatch("held-out set", values, EVERY_METRIC)
    settings = [[_get(r.config, key) for key in HELDOUT_SETTINGS] for r in runs]
    if not _differ(settings):
        return None
    differing = [i for i, key in enumerate(HELDOUT_SETTINGS) if _differ([s[i] for s in settings])]
    values = [", ".join(f"{HELDOUT_SETTINGS[i]} {_show_value(s[i])}" for i in differing) for s in settings]
    return Mismatch("held-out set", values, "they draw different held-out examples, so " + EVERY_METRIC)


def eval_setting_mismatches(runs: Sequence[RunFiles]) -> list[Mismatch]:
    """Settings that change some metrics on the same held-out examples: the answer length cap (BLEU, ROUGE) and
    the example length cap (the held-out loss)."""
    out = []
    caps = [_get(r.config, "eval.max_new_tokens") for r in runs]
    if _differ(caps):
        out.append(Mismatch("eval.max_new_tokens", [_show_value(c) for c in caps],
                            "BLEU and ROUGE are not comparable between them (answers cut at different lengths); "
                            "the held-out loss and perplexity still are"))
    lengths = [_get(r.config, "data.max_length") for r in runs]
    if _differ(lengths):
        out.append(Mismatch("data.max_length", [_show_value(n) for n in lengths],
                            "the held-out loss and perplexity are not comparable between them (held-out examples "
                            "cut at different lengths); BLEU and ROUGE still are"))
    return out


def model_mismatch(runs: Sequence[RunFiles], same_examples: bool) -> Mismatch | None:
    """The runs' base models differ: name, GGUF file or revision, or, when every run recorded them, the model
    files' fingerprint (train stage) or the folder's origin (loralab_source.json, as the manifest copied it)."""
    manifests = [r.manifest or {} for r in runs]
    names = [tuple(_get(r.config, f"model.{key}") for key in ("name_or_path", "gguf_file", "revision")) for r in runs]
    prints = [_get(m, "stages.train.inputs.model files") for m in manifests]
    origins = [json.dumps(m.get("model_source"), sort_keys=True) if m.get("model_source") else None
               for m in manifests]
    keys = [list(n) for n in names]
    for extra in (prints, origins):
        if all(extra):
            keys = [[*k, e] for k, e in zip(keys, extra, strict=True)]
    if not _differ(keys):
        return None
    values = []
    for (name, gguf_file, revision), fingerprint in zip(names, prints, strict=True):
        text = str(name) + (f" {gguf_file}" if gguf_file else "") + (f"@{revision}" if revision else "")
        if not _differ(names) and fingerprint:
            text += f" model files {_short(fingerprint, 20)}"
        values.append(text)
    consequence = "the base columns differ: each run's base values are its own base model's"
    consequence += ("; the LoRA gains (each run's change from its own base) still compare between them"
                    if same_examples else ", and the data or held-out set differ too")
    return Mismatch("model", values, consequence)


def mismatches(runs: Sequence[RunFiles]) -> list[Mismatch]:
    """Every difference between the runs that leaves some metrics not comparable, in the order: data, held-out
    set, eval settings, model. The held-out set and eval settings are checked only when the data is the same
    (different data already leaves no metric comparable)."""
    labels = run_labels(runs)
    found = []
    if (data := data_mismatch(runs)) is not None:
        found.append(data)
    elif (heldout := heldout_mismatch(runs, labels)) is not None:
        found.append(heldout)
    else:
        found += eval_setting_mismatches(runs)
    same_examples = all(m.what not in ("data", "held-out set") for m in found)
    if (model := model_mismatch(runs, same_examples)) is not None:
        found.append(model)
    return found


def comparability_warnings(runs: Sequence[RunFiles]) -> list[str]:
    """One line per :func:`mismatches` entry, naming each run by its label: stderr and the page show these."""
    labels = run_labels(runs)
    return [m.text(labels) for m in mismatches(runs)]


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
            interval = f", 95% {interval_text(values)}" if "change_low" in values else ""
            text = (
                f'{web.esc(format_metric(lora))}<br><small class="{change.cls}">base {web.esc(format_metric(base))}, '
                f"change {web.esc(change.text)}{web.esc(interval)}</small>"
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
        + web.paragraph("Each cell: the run's LoRA value, with its own base model's value and the change from it "
                        "(and its 95% interval, a paired bootstrap over the run's held-out prompts, where recorded).")
        + "".join(web.paragraph(f"{label}: {sentence}") for label, r in zip(labels, runs, strict=True)
                  if (sentence := noise_sentence(r.eval_results, len(r.predictions or []) or None)))
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
    warnings = comparability_warnings(runs)
    box = [web.warning_box("Not every metric is comparable between these runs", warnings)] if warnings else []
    sections = [
        *box,
        web.section("Runs", listing, "runs-section"),
        web.section("Config fields that differ", config_body, "config"),
        web.section("Metrics", metrics_body, "results"),
        web.section("Training curves", curve_charts(runs), "training"),
        web.section("Held-out answers side by side", answers, "prompts"),
    ]
    subtitle = ("Every number on this page is read from the runs' files "
                "(`config.yaml`, `metrics.jsonl`, `eval_results.csv`, `predictions.jsonl`).")
    return web.page(f"Comparing {len(runs)} runs: " + ", ".join(labels), subtitle, sections)
