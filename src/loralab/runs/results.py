"""Published results: the numbers a README shows for a finished run, computed from the run's own files.

Pure functions over the contents of ``eval_results.csv``, ``manifest.json``, ``metrics.jsonl`` and
``data/stats.json``; scripts/publish_results.py copies a run's files under results/ and prints these,
and tests/test_results.py checks the README against the copies, so the README cannot drift from them.
"""

from __future__ import annotations

import csv
import io

LOWER_IS_BETTER = {"eval_loss", "perplexity"}


def metric_rows(eval_csv: str) -> list[tuple[str, float, float]]:
    """(metric, base, lora) for each row of eval_results.csv."""
    return [(r["metric"], float(r["base"]), float(r["lora"])) for r in csv.DictReader(io.StringIO(eval_csv))]


def metric_table(eval_csv: str) -> str:
    """A markdown table: metric, base, LoRA, change (LoRA - base), 4 decimals as in the CSV's units."""
    lines = ["| metric | base | LoRA | change |", "|---|---|---|---|"]
    for name, base, lora in metric_rows(eval_csv):
        better = "lower is better" if name in LOWER_IS_BETTER else "higher is better"
        lines.append(f"| {name} ({better}) | {base:.4f} | {lora:.4f} | {lora - base:+.4f} |")
    return "\n".join(lines)


def run_summary(manifest: dict, metrics: list[dict], stats: dict, examples_per_step: int) -> dict:
    """Wall time per stage, training runtime and real (non-padding) tokens per second.

    The Trainer does not count the tokens it saw; steps x examples per step x the mean training example
    length (data/stats.json) estimates them, within about 1% here (500 steps are 4.2 passes over the data).
    """
    stages = manifest["stages"]
    summary = next(row for row in metrics if "train_runtime" in row)
    steps = stages["train"]["steps"]
    mean_tokens = stats["train"]["tokens"] / stats["train"]["examples"]
    mean_trained = stats["train"]["trained_tokens"] / stats["train"]["examples"]
    examples = steps * examples_per_step
    return {
        "steps": steps,
        "wall_s": {name: stage["wall_s"] for name, stage in stages.items()},
        "train_runtime_s": summary["train_runtime"],
        "tokens_per_s": examples * mean_tokens / summary["train_runtime"],
        "trained_tokens_per_s": examples * mean_trained / summary["train_runtime"],
        "precision": manifest["precision"],
    }


def summary_lines(summary: dict) -> list[str]:
    """The README's lines of run facts, in the form the test looks for."""
    wall = summary["wall_s"]
    total = sum(wall.values())
    return [
        f"- Steps: {summary['steps']}; precision {summary['precision']}",
        (f"- Wall time: {total / 60:.1f} min in all (prepare {wall['prepare']:.0f} s, "
         f"train {wall['train'] / 60:.1f} min, "
         f"eval {wall['eval'] / 60:.1f} min, report {wall['report']:.0f} s)"),
        (f"- Training speed: {summary['tokens_per_s']:.1f} tokens/s ({summary['trained_tokens_per_s']:.1f} trained "
         f"response tokens/s) over the trainer's {summary['train_runtime_s'] / 60:.1f} min"),
    ]


def speed_table(seeds: list[int], summaries: list[dict]) -> str:
    """A markdown table of each seed's run facts: wall time in all and in training, and training speed."""
    lines = ["| seed | wall time in all | train | eval | tokens/s (trained response tokens/s) |",
             "|---|---|---|---|---|"]
    for seed, s in zip(seeds, summaries, strict=True):
        wall = s["wall_s"]
        lines.append(f"| {seed} | {sum(wall.values()) / 60:.1f} min | {wall['train'] / 60:.1f} min | "
                     f"{wall['eval'] / 60:.1f} min | {s['tokens_per_s']:.1f} ({s['trained_tokens_per_s']:.1f}) |")
    return "\n".join(lines)
