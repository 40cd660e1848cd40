"""`loralab plan`: the predicted peak memory and training time of a config on a device, printed as a table
(loralab.decisions decides the switches, loralab.planning does the arithmetic; this reads the model's config.json
and the prepared lengths)."""

from __future__ import annotations

from dataclasses import replace

from loralab import decisions
from loralab.config import ExperimentConfig
from loralab.files import read_jsonl
from loralab.grid import PlannedCell, plan_sweep
from loralab.models.loading import read_model_config
from loralab.planning.inputs import PlanInputs
from loralab.planning.measure import resolve_profile
from loralab.planning.memory import MemoryItem
from loralab.planning.plan import Plan
from loralab.planning.profiles import GB
from loralab.runs.fingerprints import evaluated
from loralab.runs.layout import RunDir


def read_lengths(cfg: ExperimentConfig) -> tuple[list[int], list[int], str]:
    """(lengths, trained counts, where from): the prepared train split, or max_length for every example."""
    train_file = RunDir(cfg).train_file
    if train_file.exists():
        rows = read_jsonl(train_file)
        if rows:
            lengths, trained = decisions.example_lengths(rows)
            return lengths, trained, f"{len(rows)} prepared examples in {train_file}"
    n = cfg.data.max_length
    count = max(cfg.train.per_device_train_batch_size, (cfg.data.num_examples or 0) - cfg.data.eval_size)
    return [n] * count, [n] * count, (
        f"data not prepared: assuming every example is data.max_length={n} tokens "
        "(run `loralab prepare CONFIG` for real lengths)"
    )


def _fmt_bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.0f} MB"


def _fmt_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def format_plan(plan: Plan, source: str = "") -> str:
    """The plan as a plain-text table."""
    lines = [f"plan for {plan.device.description} [{plan.device.name}], precision {plan.precision}"]
    if source:
        lines.append(f"lengths: {source}")
    lines.append(f"params: {plan.total_params:,} total, {plan.trainable_params:,} trainable (LoRA)")
    lines.append(f"largest micro-batch: {plan.peak_tokens:,} tokens packed in one row; average {plan.mean_tokens:,.0f}")
    lines.append("")
    width = max(len(m.label) for m in plan.memory)
    lines.append(f"{'memory':<{width}}  {'bytes':>9}  what")
    for m in plan.memory:
        if m.bytes == 0:
            continue
        lines.append(f"{m.label:<{width}}  {_fmt_bytes(m.bytes):>9}  {m.note}")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    share = plan.peak_bytes / plan.device.memory_bytes
    lines.append(f"{'peak':<{width}}  {_fmt_bytes(plan.peak_bytes):>9}  {verdict}: {100 * share:.0f}% of "
                 f"{_fmt_bytes(plan.device.memory_bytes)}")
    if plan.fits and share > 0.9:
        lines.append(f"{'':<{width}}  {'':>9}  tight: under 10% headroom; gradient checkpointing would add margin")
    lines.append("")
    lines.append(f"time: {plan.flops_per_microbatch / 1e12:.2f} TFLOP per micro-batch -> "
                 f"{_fmt_seconds(plan.microbatch_seconds)}; "
                 f"{_fmt_seconds(plan.step_seconds)} per optimizer step; {plan.max_steps} steps -> "
                 f"{_fmt_seconds(plan.run_seconds)} "
                 f"({plan.tokens_per_second:,.0f} tokens/s)")
    lines.append(f"time constants: {plan.device.basis}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    if plan.suggestions:
        lines.append("")
        lines.append("to make it fit (each alone, predicted peak):")
        for s in plan.suggestions:
            mark = "fits" if s.fits else "still too big"
            flags = " ".join(f"--set {kv}" for kv in s.settings)
            lines.append(f"  {flags}  ({s.note}): {_fmt_bytes(s.peak_bytes)}, {mark}, "
                         f"{_fmt_seconds(s.microbatch_seconds)} per micro-batch")
        if not any(s.fits for s in plan.suggestions):
            lines.append("  nothing loralab can change fits this model here: pick a smaller model or a bigger device")
    return "\n".join(lines)


def plan_config(cfg: ExperimentConfig, profile, processes: int = 1,
                lengths: tuple[list[int], list[int], str] | None = None) -> tuple[Plan, str]:
    """The plan of ``cfg`` on the device ``profile``, per device when ``processes`` share each step (DDP), and where
    its example lengths came from (``lengths``: given, else read_lengths)."""
    precision = profile.default_precision if cfg.train.precision == "auto" else cfg.train.precision
    model_config = read_model_config(cfg.model)
    lengths, trained, source = lengths or read_lengths(cfg)
    # Under DDP each device holds the whole model and trains its share of every step's examples.
    train = replace(cfg.train, per_device_train_batch_size=1,
                    gradient_accumulation_steps=decisions.per_process_examples(cfg.train, processes))
    inputs = PlanInputs(model_config, cfg.lora, train, lengths, profile, trained, cfg.model.attn_implementation)
    plan = decisions.plan_run(inputs, precision)
    if processes > 1:
        # DDP's gradient buckets: a second copy of the trainable gradients (fp32) for the all-reduce
        plan.memory.append(MemoryItem("DDP gradient buckets", plan.trainable_params * 4,
                                      f"{plan.trainable_params:,} trainable gradients x 4 bytes for the all-reduce"))
        plan.notes.append(f"{processes} processes (DDP): memory and time are per device, each training "
                          f"{train.gradient_accumulation_steps} of the {processes * train.gradient_accumulation_steps} "
                          f"examples of a step; the all-reduce of {plan.trainable_params:,} gradients is not counted")
    return plan, source


def run(cfg: ExperimentConfig, device: str = "auto", calibrate: bool = False, processes: int = 1,
        seeds: int = 1) -> Plan:
    """Print the plan for ``cfg`` on ``device``, per device when ``processes`` share each step (DDP), and the
    training time of ``seeds`` runs of it (`loralab run --seeds`); return the plan. ``calibrate``: measure this
    CPU's matmul peaks again (the first plan measures them; later ones read them back)."""
    plan, source = plan_config(cfg, resolve_profile(device, fresh=calibrate), processes)
    print(format_plan(plan, source))
    if seeds > 1:
        print(f"{seeds} seeds: {_fmt_seconds(plan.run_seconds * seeds)} of training in all (one run after another)")
    return plan


def _sweep_lengths(cells: list[PlannedCell]) -> dict[int, tuple[list[int], list[int], str]]:
    """Each cell's example lengths: its own prepared split, else that of a cell with the same data settings
    (the sweep shares it), else read_lengths' assumption."""
    found: dict[int, tuple[list[int], list[int], str]] = {}
    for i, c in enumerate(cells):
        found[i] = read_lengths(c.run_configs[0])
    for i, c in enumerate(cells):
        if not RunDir(c.run_configs[0]).train_file.exists():
            same = [j for j, d in enumerate(cells) if d.config.data == c.config.data
                    and d.config.model == c.config.model and RunDir(d.run_configs[0]).train_file.exists()]
            if same:
                found[i] = found[same[0]]
    return found


def run_sweep(config_path: str, grid: list[str], overrides: list[str], seeds: int | None, device: str = "auto",
              calibrate: bool = False, processes: int = 1) -> float:
    """Print each cell's predicted peak memory and training time, and the sweep's total; return the total seconds
    of the runs not yet evaluated (a rerun sweep skips the others)."""
    sweep = plan_sweep(config_path, grid, overrides, seeds)
    profile = resolve_profile(device, fresh=calibrate)
    lengths = _sweep_lengths(sweep.cells)
    lines, total, left = [], 0.0, 0.0
    for i, c in enumerate(sweep.cells):
        plan, _ = plan_config(c.config, profile, processes, lengths[i])
        done = sum(evaluated(r) for r in c.run_configs)
        seconds = plan.run_seconds * c.seeds
        total += seconds
        left += plan.run_seconds * (c.seeds - done)
        settings = ", ".join(f"{k}={t}" for k, _, t in c.cell.settings)
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines.append(f"  {settings}: peak {_fmt_bytes(plan.peak_bytes)} ({verdict}), {_fmt_seconds(plan.run_seconds)} "
                     f"per run x {c.seeds} = {_fmt_seconds(seconds)}" + (f"; {done} done" if done else ""))
    print(f"sweep plan for {profile.description} [{profile.name}]: {len(sweep.cells)} cells x "
          f"{sweep.cells[0].seeds} seed(s) = {sweep.runs} runs")
    print(f"lengths: {lengths[0][2]}")
    print("\n".join(lines))
    print(f"total: {_fmt_seconds(total)} of training" + (f", {_fmt_seconds(left)} of it still to run" if left != total
                                                          else "") + " (prepare, eval and model loads not counted)")
    return left
