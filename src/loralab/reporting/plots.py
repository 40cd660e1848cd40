"""The figures of a run: the loss curve (loss, grad norm, learning rate, held-out loss) and the flow diagram of how
the run fits together, each rendered in memory and written atomically.

matplotlib's object API on an Agg canvas, never pyplot, so plotting does not change the backend or global figure
state of the process that calls it.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from matplotlib.ticker import MaxNLocator

from loralab.files import atomic_write_bytes
from loralab.reporting.tables import format_count, format_parameters, format_targets, show
from loralab.runs.readers import METRIC_LABELS, eval_loss_rows, format_metric, training_rows

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
            [r["step"] for r in heldout], [r["eval_loss"] for r in heldout], "s--", color="C1", ms=5,
            label="held-out loss"
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
        steps, values = zip(*points, strict=False)
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
    boxes = _flow_boxes(info)
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
            base_lines = ["frozen base model", *_wrap(show(info.get("model")), 38)]
            ax.text(x + width / 2, bottom + 0.85, "\n".join(base_lines), ha="center", va="top", fontsize=8.5,
                    linespacing=1.35)
        if stage:
            start, end = (x + width + 0.08, middle), (x + width + gap - 0.08, middle)
            ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=20))
            ax.text(x + width + gap / 2, middle + 0.1, stage, ha="center", va="bottom", fontsize=8.5, style="italic")
    _save_figure(fig, path)


def _flow_boxes(info: dict) -> list[tuple[str, str, list[str], str | None]]:
    """The flow diagram's boxes: (title, fill colour, body lines, stage that leads from this box to the next)."""
    fraction = info.get("trained_token_fraction")
    params = info.get("parameters")
    metrics = info.get("metrics")
    return [
        (
            "Raw data",
            "#e8f0fe",
            [
                *_wrap(show(info.get("data_path"))),
                f"{format_count(info.get('source_records'))} source records",
                f"{format_count(info.get('train_examples'))} train / "
                f"{format_count(info.get('eval_examples'))} held-out",
            ],
            "prepare",
        ),
        (
            "Chat template + masking",
            "#fef7e0",
            [
                "prompt and answer in the",
                "model's chat template,",
                f"at most {show(info.get('max_length'))} tokens;",
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
                f"r = {show(info.get('r'))}, alpha = {show(info.get('lora_alpha'))}",
                *_wrap("on " + format_targets(info.get("target_modules"))),
                "trainable parameters:",
                *_wrap(format_parameters(params)),
            ],
            "eval",
        ),
        ("Evaluation", "#fce8e6", _metric_lines(metrics), None),
    ]


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


