"""The report's rows and formats in one place, so report.md, report.html and the tests that check them agree."""

from __future__ import annotations

import math
from typing import Any

from loralab.config import config_from_dict, run_warnings
from loralab.errors import LoralabError
from loralab.runs.layout import STATS_FILE
from loralab.runs.readers import METRIC_LABELS, STAGE_ORDER, format_lr


def format_change(base: float, lora: float) -> str:
    return "n/a" if math.isnan(base) or math.isnan(lora) else f"{lora - base:+.4f}"


def format_count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_targets(targets: Any) -> str:
    if targets is None:
        return "n/a"
    return targets if isinstance(targets, str) else ", ".join(map(str, targets))


def format_parameters(params: dict | None) -> str:
    if not params or not {"trainable", "total", "trainable_percent"} <= params.keys():
        return "n/a"
    return f"{params['trainable']:,} of {params['total']:,} ({params['trainable_percent']:.2f}%)"


def show(value: Any) -> str:
    return "n/a" if value is None else str(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def section(config: dict, name: str) -> dict:
    return config.get(name) or {}


def setup_rows(config: dict, manifest: dict | None, stats: dict | None) -> list[list[str]]:
    """The setup table's ``[setting, value]`` rows, values in Markdown (`code` spans); shared by report.md and
    report.html."""
    model, data, lora, train = (section(config, name) for name in ("model", "data", "lora", "train"))
    manifest = manifest or {}
    examples, tokens = _data_cells(stats)
    template = (stats or {}).get("template") or data.get("template")

    batch, accumulation = train.get("per_device_train_batch_size"), train.get("gradient_accumulation_steps")
    per_step = batch * accumulation if batch is not None and accumulation is not None else None
    device = manifest.get("device")
    if device and manifest.get("device_name"):
        device = f"{device} ({manifest['device_name']})"
    seeds = manifest.get("seeds")
    data_hash = manifest.get("data_sha256")

    return [
        ["Base model (frozen)", f"`{show(model.get('name_or_path'))}`"],
        ["Data", f"`{show(data.get('path'))}`" + (f" (sha256 `{data_hash[:12]}`)" if data_hash else "")],
        ["Examples", examples],
        ["Tokens", tokens],
        ["Prompt format", f"{show(template)} template, at most {show(data.get('max_length'))} tokens"],
        [
            "LoRA",
            f"r = {show(lora.get('r'))}, alpha = {show(lora.get('lora_alpha'))}, "
            f"dropout = {show(lora.get('lora_dropout'))}",
        ],
        ["Target modules", format_targets(lora.get("target_modules"))],
        ["Trainable parameters", format_parameters(manifest.get("parameters"))],
        [
            "Batch",
            f"{show(batch)} x {show(accumulation)} accumulation = {show(per_step)} examples per optimizer step",
        ],
        ["Steps", show(train.get("max_steps"))],
        [
            "Learning rate",
            f"{format_lr(train.get('learning_rate'))}, {show(train.get('lr_scheduler_type'))} schedule, "
            f"warmup {show(train.get('warmup_steps'))} steps",
        ],
        ["Seeds", ", ".join(f"{k} {v}" for k, v in seeds.items()) if seeds else show(train.get("seed"))],
        ["Device", show(device)],
        # The manifest records the precision actually used, which can differ from the one asked for.
        ["Precision", show(manifest.get("precision") or train.get("precision"))],
        ["loralab", f"{show(manifest.get('loralab_version'))}, commit `{show(manifest.get('git_commit'))}`"],
    ]


def stage_timing_rows(manifest: dict | None) -> list[list[str]]:
    """``[stage, wall time, finished at]`` per recorded stage, in pipeline order; empty when none is recorded."""
    # The report stage is left out: its entry, if any, is from an earlier report, not this one.
    stages = {k: v for k, v in ((manifest or {}).get("stages") or {}).items() if k != "report"}
    ordered = sorted(stages, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
    return [
        [
            stage,
            format_duration(stages[stage]["wall_s"]) if "wall_s" in stages[stage] else "n/a",
            show(stages[stage].get("finished_at")),
        ]
        for stage in ordered
    ]


def not_yet(name: str) -> str:
    return (f"_Not available yet: `{name}` is missing. "
            "Run the eval stage (`loralab eval CONFIG`), then the report again._")


def _data_cells(stats: dict | None) -> tuple[str, str]:
    """The setup table's Examples and Tokens cells, from data/stats.json."""
    if not stats:
        missing = f"not recorded (`{STATS_FILE}` is missing)"
        return missing, missing
    tr, ev = stats.get("train", {}), stats.get("eval", {})
    examples = (
        f"{format_count(tr.get('examples'))} train / {format_count(ev.get('examples'))} held-out "
        f"(selected {format_count(stats.get('selected'))} of {format_count(stats.get('source_records'))} "
        f"source records; {format_count(stats.get('truncated'))} truncated, "
        f"{format_count(stats.get('dropped'))} dropped)"
    )
    fraction = stats.get("trained_token_fraction")
    # prepare computes the share over train and held-out tokens together, so it is labelled as such.
    tokens = (
        f"{format_count(tr.get('trained_tokens'))} of {format_count(tr.get('tokens'))} train tokens carry loss "
        f"(prompts masked); trained-token share over both splits "
        f"{'n/a' if fraction is None else f'{fraction:.1%}'}"
    )
    return examples, tokens


TOO_SHORT = "Too short to judge"


def too_short_lines(config: dict) -> list[str]:
    """Why the run of ``config`` (config.yaml as read) is too short to judge, one line each (config.run_warnings);
    empty for a run long enough, or a config this version cannot read."""
    try:
        return run_warnings(config_from_dict(config))
    except (LoralabError, TypeError, ValueError):
        return []


def has_intervals(eval_results: dict | None) -> bool:
    """Whether eval_results.csv carries the paired-bootstrap intervals (files written before them do not)."""
    return bool(eval_results) and any("change_low" in v for v in eval_results.values())


def interval_text(values: dict) -> str:
    """A change's 95% interval, ``[-0.0091, +0.0080]``, or n/a where the metric has no per-prompt score."""
    if "change_low" not in values:
        return "n/a"
    return f"[{values['change_low']:+.4f}, {values['change_high']:+.4f}]"


def noise_sentence(eval_results: dict | None, prompts: int | None) -> str | None:
    """In words, which changes are not distinguishable from noise on this many prompts (interval holds 0)."""
    if not has_intervals(eval_results):
        return None
    noisy = [METRIC_LABELS.get(name, name) for name, v in eval_results.items()
             if "change_low" in v and v["change_low"] <= 0.0 <= v["change_high"]]
    many = f"{prompts:,} held-out prompts" if prompts else "these held-out prompts"
    if not noisy:
        return (f"Every 95% interval (a paired bootstrap over the {many}) excludes 0: every change "
                f"is larger than the noise of resampling these prompts.")
    what = ", ".join(noisy)
    return (f"The change in {what} is not distinguishable from noise on {many}: its 95% interval (a paired "
            f"bootstrap, the same resampled prompts for base and LoRA) holds 0.")
