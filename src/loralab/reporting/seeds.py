"""The result of one config trained under several seeds: each metric as mean ± sd over the seeds, with every
seed's value beside it, read from the seeds' eval_results.csv files."""

from __future__ import annotations

import statistics

from loralab.reporting.tables import interval_text
from loralab.runs.readers import METRIC_LABELS, format_metric


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seeds_table(runs: list[tuple[int, dict]]) -> str:
    """``runs``: (seed, eval_results as runs.readers.read_eval_results gives them) per seed, in order. A Markdown
    table of each metric's base, LoRA and change as mean ± sd over the seeds, then the change under each seed with
    its 95% interval (a paired bootstrap over that run's held-out prompts) where the file has one."""
    seeds = [seed for seed, _ in runs]
    names = [n for n in runs[0][1] if all(n in results for _, results in runs)]
    header = ["Metric", "Base (mean ± sd)", "LoRA (mean ± sd)", "Change (mean ± sd)",
              *(f"change, seed {s}" for s in seeds)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n in names:
        cells = [METRIC_LABELS.get(n, n)]
        changes = [r[n]["lora"] - r[n]["base"] for _, r in runs]
        for side in ("base", "lora"):
            m, sd = mean_sd([r[n][side] for _, r in runs])
            cells.append(f"{format_metric(m)} ± {format_metric(sd)}")
        m, sd = mean_sd(changes)
        cells.append(f"{m:+.4f} ± {sd:.4f}")
        cells += [f"{c:+.4f}" + (f" {interval_text(r[n])}" if "change_low" in r[n] else "")
                  for c, (_, r) in zip(changes, runs, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_markdown(name: str, runs: list[tuple[int, dict]]) -> str:
    """The summary file <output_dir>/<name>-seeds.md: a sentence on what it is, then seeds_table(runs)."""
    seeds = [seed for seed, _ in runs]
    return (f"# {name}: {len(seeds)} seeds\n\n"
            f"The same config trained under the seeds {', '.join(map(str, seeds))} (train.seed; the data split is the "
            f"same). Each value is read from the seeds' `eval_results.csv`; sd is the sample standard deviation over "
            f"the seeds; in brackets, each seed's 95% interval on its change (a paired bootstrap over the held-out "
            f"prompts).\n\n" + seeds_table(runs) + "\n")
