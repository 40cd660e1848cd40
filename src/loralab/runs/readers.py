"""A finished run's files read into values: the readers, labels and formats that the report, compare and their
tests share, so every number they show is read one way from the run directory."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from loralab.errors import LoralabError
from loralab.files import JsonlError, parse_jsonl
from loralab.runs.layout import (
    CONFIG_FILE,
    EVAL_RESULTS_FILE,
    EXAMPLES_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    STATS_FILE,
)
from loralab.runs.results import run_summary

METRIC_LABELS = {
    "bleu": "BLEU",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "perplexity": "Perplexity (lower is better)",
    "eval_loss": "Held-out loss (lower is better)",
}
LOWER_IS_BETTER = frozenset({"perplexity", "eval_loss"})
# eval_results.csv's columns after metric, base, lora (files written before them have none): the change, its 95%
# paired-bootstrap interval, and the shares of held-out prompts where LoRA is better, worse or tied
CHANGE_COLUMNS = ("change", "change_low", "change_high", "lora_better", "lora_worse", "tied")
STAGE_ORDER = ("prepare", "train", "eval")


def read_metrics(path: Path) -> list[dict]:
    """All rows of a ``metrics.jsonl`` file, in file order (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        try:
            rows = parse_jsonl(f)
        except JsonlError as err:
            raise ValueError(f"{path}, {err}") from None
    for lineno, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {lineno}: expected a JSON object, got {type(row).__name__}")
    return rows


def read_eval_results(path: Path) -> dict[str, dict[str, float]]:
    """``eval_results.csv`` as ``{metric: {"base": value, "lora": value, ...}}`` in file order; empty base/lora cells
    read as NaN; the CHANGE_COLUMNS a file has are added where filled."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"metric", "base", "lora"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: the header needs columns metric,base,lora; missing {', '.join(sorted(missing))}")
        extra = [c for c in CHANGE_COLUMNS if c in (reader.fieldnames or ())]
        return {row["metric"]: {"base": _parse_cell(row["base"]), "lora": _parse_cell(row["lora"]),
                                **{c: _parse_cell(row[c]) for c in extra if (row[c] or "").strip()}}
                for row in reader}


def _parse_cell(text: str | None) -> float:
    return float(text) if text and text.strip() else math.nan


def training_rows(rows: list[dict]) -> list[dict]:
    """The training log rows (those with ``step`` and ``loss``), one per step, sorted by step.

    A run resumed from a checkpoint logs the steps after that checkpoint a second time; the later row
    is the one that belongs to the finished run, so it wins.
    """
    by_step = {row["step"]: row for row in rows if "step" in row and "loss" in row}
    return [by_step[step] for step in sorted(by_step)]


def eval_loss_rows(rows: list[dict]) -> list[dict]:
    """The held-out loss rows (those with ``step`` and ``eval_loss``), one per step, sorted by step."""
    by_step = {row["step"]: row for row in rows if "step" in row and "eval_loss" in row}
    return [by_step[step] for step in sorted(by_step)]


def summary_row(rows: list[dict]) -> dict | None:
    summaries = [row for row in rows if "train_runtime" in row or "train_loss" in row]
    return summaries[-1] if summaries else None


class MissingRunFile(LoralabError, FileNotFoundError):
    """A file the report cannot do without is missing from the run directory; the message names the stage to run."""


def read_published_summary(folder: Path) -> dict:
    """runs.results.run_summary of a published run's files (results/NAME/: config.yaml, manifest.json,
    metrics.jsonl, stats.json side by side, as scripts/publish_results.py copies them)."""
    config = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    per_step = config["train"]["per_device_train_batch_size"] * config["train"]["gradient_accumulation_steps"]
    return run_summary(json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8")),
                       read_metrics(folder / METRICS_FILE),
                       json.loads((folder / Path(STATS_FILE).name).read_text(encoding="utf-8")), per_step)


def _require(run_dir: Path, name: str, stage: str, why: str) -> Path:
    path = run_dir / name
    if not path.is_file():
        raise MissingRunFile(
            f"{name} not found in {run_dir} ({why}); run the {stage} stage first: "
            f"`loralab {stage} CONFIG` (or `loralab run CONFIG`)"
        )
    return path


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def format_metric(value: float | None) -> str:
    """A metric value as the report prints it: 4 decimals, ``n/a`` when missing."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def format_lr(value: float | None) -> str:
    """A learning rate as the report prints it: scientific notation, 3 significant digits."""
    return "n/a" if value is None else f"{value:.2e}"


def curves(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """``(step, value)`` points of each logged curve: ``loss``, ``eval_loss``, ``grad_norm``, ``learning_rate``."""
    train = training_rows(rows)
    out = {key: [(r["step"], r[key]) for r in train if r.get(key) is not None]
           for key in ("loss", "grad_norm", "learning_rate")}
    out["eval_loss"] = [(r["step"], r["eval_loss"]) for r in eval_loss_rows(rows)]
    return out


def prompt_text(prediction: dict) -> str:
    """A held-out example's prompt as a person reads it: the instruction, then its input when present."""
    if not prediction.get("instruction"):
        # Chat, ShareGPT and prompt/completion records have no instruction: show the rendered prompt.
        return prediction.get("prompt", "")
    return prediction["instruction"] + (f"\n\n{prediction['input']}" if prediction.get("input") else "")


def example_rouge_l(prediction: dict, side: str) -> float:
    """Per-example ROUGE-L F1 of the ``base`` or ``lora`` answer, as the eval stage recorded it; NaN if absent."""
    value = ((prediction.get("scores") or {}).get(side) or {}).get("rougeL")
    return math.nan if value is None else float(value)


@dataclass
class RunFiles:
    """What the report reads from one run directory; ``None`` where an optional file is absent."""

    root: Path
    config: dict
    rows: list[dict]  # metrics.jsonl, in file order
    manifest: dict | None
    stats: dict | None
    eval_results: dict[str, dict[str, float]] | None
    predictions: list[dict] | None
    examples: str | None

    @property
    def name(self) -> str:
        return self.config.get("name") or self.root.name

    @property
    def sources(self) -> list[str]:
        """The run directory's files this report reads that exist, in a fixed order."""
        names = (CONFIG_FILE, MANIFEST_FILE, STATS_FILE, METRICS_FILE, EVAL_RESULTS_FILE, PREDICTIONS_FILE,
                 EXAMPLES_FILE)
        return [name for name in names if (self.root / name).is_file()]


def read_run(run_dir: Path) -> RunFiles:
    """Read a run directory's files. Raises :class:`MissingRunFile` naming the stage to run when
    ``config.yaml`` or ``metrics.jsonl`` is absent."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingRunFile(f"{run_dir} is not a directory; give a run directory (<output_dir>/<name>/)")
    config_path = _require(run_dir, CONFIG_FILE, "prepare", "it holds the resolved experiment config")
    metrics_path = _require(run_dir, METRICS_FILE, "train", "it holds the training log")
    eval_path, predictions_path = run_dir / EVAL_RESULTS_FILE, run_dir / PREDICTIONS_FILE
    examples_path = run_dir / EXAMPLES_FILE
    return RunFiles(
        root=run_dir,
        config=yaml.safe_load(config_path.read_text(encoding="utf-8")) or {},
        rows=read_metrics(metrics_path),
        manifest=_read_json(run_dir / MANIFEST_FILE),
        stats=_read_json(run_dir / STATS_FILE),
        eval_results=read_eval_results(eval_path) if eval_path.is_file() else None,
        predictions=read_metrics(predictions_path) if predictions_path.is_file() else None,
        examples=examples_path.read_text(encoding="utf-8") if examples_path.is_file() else None,
    )
