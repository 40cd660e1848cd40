"""The result of one config trained under several seeds: each metric as mean ± sd over the seeds, with every
seed's value beside it, read from the seeds' eval_results.csv files."""

from __future__ import annotations

import statistics

from loralab.runs.readers import METRIC_LABELS, format_metric


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seeds_markdown(name: str, runs: list[tuple[int, dict]]) -> str:
    """``runs``: (seed, eval_results as runs.readers.read_eval_results gives them) per seed, in order. A table of
    each metric's base, LoRA and change as mean ± sd over the seeds, then the change under each seed."""
    seeds = [seed for seed, _ in runs]
    names = [n for n in runs[0][1] if all(n in results for _, results in runs)]
    header = ["Metric", "Base (mean ± sd)", "LoRA (mean ± sd)", "Change (mean ± sd)",
              *(f"change, seed {s}" for s in seeds)]
    lines = [f"# {name}: {len(seeds)} seeds", "",
             f"The same config trained under the seeds {', '.join(map(str, seeds))} (train.seed; the data split is "
             f"the same). Each value is read from the seeds' `eval_results.csv`; sd is the sample standard deviation "
             f"over the seeds.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n in names:
        cells = [METRIC_LABELS.get(n, n)]
        changes = [r[n]["lora"] - r[n]["base"] for _, r in runs]
        for side in ("base", "lora"):
            m, sd = mean_sd([r[n][side] for _, r in runs])
            cells.append(f"{format_metric(m)} ± {format_metric(sd)}")
        m, sd = mean_sd(changes)
        cells.append(f"{m:+.4f} ± {sd:.4f}")
        cells += [f"{c:+.4f}" for c in changes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
