"""`loralab inspect`: look at what the model will be trained on before spending hours on it.

Shows a few examples as the model sees them, with the trained tokens marked, and checks the whole
selection for the mistakes that silently ruin a fine-tune: examples with nothing to learn, responses
cut by max_length, an end-of-sequence token that is never trained (the model never learns to stop), and
a chat template that does not round-trip. The checks are pure functions over encoded examples, so tests
can feed them hand-made bad data; ``run`` encodes the config's records in memory with loralab.data,
exactly as ``loralab prepare`` does, so it needs no earlier stage.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab import IGNORE_INDEX
from loralab.config import ExperimentConfig
from loralab.data import (
    DataError,
    Encoded,
    Template,
    dedupe,
    encode_example,
    make_template,
    read_format,
    select_and_split,
    trained_token_count,
)
from loralab.errors import LoralabError
from loralab.files import atomic_write_bytes
from loralab.models.loading import load_tokenizer
from loralab.runs.layout import RunDir
from loralab.sources import read_records

ANSI_TRAINED = "\x1b[1;32m"  # bold green
ANSI_RESET = "\x1b[0m"
PLAIN_OPEN, PLAIN_CLOSE = "⟦", "⟧"


@dataclass
class Finding:
    check: str
    status: str  # "ok", "warning" or "error"
    message: str
    indices: list[int] = field(default_factory=list)
    """Examples the finding is about (positions in the list checked)."""


# Rendering ----------------------------------------------------------------------------------------

def trained_runs(labels: Sequence[int]) -> list[tuple[int, int, bool]]:
    """Maximal runs of positions that are all trained or all masked: (start, end, trained)."""
    runs: list[tuple[int, int, bool]] = []
    for pos, label in enumerate(labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][2] == trained:
            runs[-1] = (runs[-1][0], pos + 1, trained)
        else:
            runs.append((pos, pos + 1, trained))
    return runs


def render_example(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int], color: bool = False) -> str:
    """The example's text with trained tokens marked: ANSI bold green, or ⟦...⟧ when ``color`` is off."""
    pieces, prev = [], ""
    for start, end, trained in trained_runs(labels):
        # Decode growing prefixes, not each run alone: sentencepiece drops a run's leading space otherwise.
        text = tokenizer.decode(list(input_ids[:end]), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece = text[len(prev):] if text.startswith(prev) else tokenizer.decode(list(input_ids[start:end]),
                                                                                skip_special_tokens=False)
        prev = text
        if trained:
            piece = f"{ANSI_TRAINED}{piece}{ANSI_RESET}" if color else f"{PLAIN_OPEN}{piece}{PLAIN_CLOSE}"
        pieces.append(piece)
    return "".join(pieces)


# Checks -------------------------------------------------------------------------------------------

def _some(indices: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (", ..." if len(indices) > limit else "")


def check_trained_tokens(examples: Sequence[Encoded]) -> Finding:
    """Examples whose labels are all masked teach nothing (prepare drops them)."""
    empty = [i for i, ex in enumerate(examples) if trained_token_count(ex.labels) == 0]
    if not empty:
        return Finding("trained tokens", "ok", f"every one of {len(examples)} examples has trained tokens")
    status = "error" if len(empty) == len(examples) else "warning"
    cut = sum(examples[i].truncated for i in empty)
    why = f"; {cut} of them lost their whole response to data.max_length (raise it)" if cut else ""
    return Finding("trained tokens", status, f"{len(empty)} of {len(examples)} examples have no trained token "
                   f"(examples {_some(empty)}){why}; prepare drops them", empty)


def check_truncation(examples: Sequence[Encoded], max_length: int) -> Finding:
    cut = [i for i, ex in enumerate(examples) if ex.truncated]
    if not cut:
        return Finding("truncation", "ok", f"no example is longer than data.max_length={max_length}")
    share = len(cut) / len(examples)
    return Finding("truncation", "warning", f"{len(cut)} of {len(examples)} examples ({100 * share:.0f}%) are cut at "
                   f"data.max_length={max_length}; their responses lose the end and the EOS "
                   f"(examples {_some(cut)})", cut)


def check_eos_trained(examples: Sequence[Encoded], eos_token_id: int) -> Finding:
    """Every complete example should end its trained tokens with EOS, or generation never learns to stop."""
    complete = [i for i, ex in enumerate(examples) if not ex.truncated and trained_token_count(ex.labels) > 0]
    missing = []
    for i in complete:
        trained = [x for x in examples[i].labels if x != IGNORE_INDEX]
        if trained[-1] != eos_token_id:
            missing.append(i)
    if not complete:
        return Finding("EOS trained", "warning", "no complete example (untruncated, with trained tokens) to check")
    if not missing:
        return Finding("EOS trained", "ok", f"EOS is the last trained token of all {len(complete)} complete examples")
    return Finding("EOS trained", "error", f"EOS (id {eos_token_id}) is not trained in {len(missing)} of "
                   f"{len(complete)} complete examples (examples {_some(missing)}): the model will not learn to stop",
                   missing)


def check_template_roundtrip(tokenizer: Any, template: Template, records: Sequence[dict], examples: Sequence[Encoded],
                             assistant_turns: str = "all") -> Finding:
    """The prompt is a prefix of the full rendering, and the trained tokens decode to the trained text
    (each trained answer with its EOS)."""
    problems: list[tuple[int, str]] = []
    for i, (record, ex) in enumerate(zip(records, examples, strict=False)):
        prompt = template.prompt_text(record)
        try:
            full, _ = template.render(record, assistant_turns)
            expected = template.trained_text(record, assistant_turns)
        except DataError as err:
            problems.append((i, str(err)))
            continue
        if not full.startswith(prompt):
            problems.append((i, "the prompt alone renders differently from the start of the full conversation"))
            continue
        if ex.truncated:
            continue  # a cut response cannot decode to the whole answer
        trained = [x for x in ex.labels if x != IGNORE_INDEX]
        decoded = tokenizer.decode(trained, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if decoded.strip() == expected.strip():
            continue
        if " ".join(decoded.split()) == " ".join(expected.split()):
            continue  # the tokenizer normalises whitespace; the tokens are still the response's
        at = next((k for k, (a, b) in enumerate(zip(decoded, expected, strict=False)) if a != b),
                  min(len(decoded), len(expected)))
        problems.append((i, f"trained tokens decode to {decoded[max(0, at - 20):at + 20]!r} where the response + EOS "
                            f"has {expected[max(0, at - 20):at + 20]!r}"))
    if not problems:
        return Finding("template round-trip", "ok", "prompt is a prefix and trained tokens decode to response + EOS "
                       f"in all {len(records)} examples ({template.kind} template)")
    first_index, first_problem = problems[0]
    return Finding("template round-trip", "error", f"{len(problems)} of {len(records)} examples fail ({template.kind} "
                   f"template); example {first_index}: {first_problem}", [i for i, _ in problems])


def length_histogram(lengths: Sequence[int], max_length: int, bins: int = 10) -> list[tuple[int, int, int]]:
    """(low, high, count) for ``bins`` equal bins over [0, max_length]; high is inclusive."""
    width = max(1, -(-max_length // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, max(0, (n - 1) // width))] += 1
    return [(k * width + 1, min((k + 1) * width, max_length), counts[k]) for k in range(bins)]


def format_histogram(histogram: list[tuple[int, int, int]], truncated: int = 0, bar_width: int = 40) -> str:
    """Text bars; the last bin says how many of its examples were cut at max_length."""
    top = max((c for _, _, c in histogram), default=0) or 1
    lines = [f"{lo:>6}-{hi:<6} {count:>6}  {'#' * round(bar_width * count / top)}" for lo, hi, count in histogram]
    if truncated and lines:
        lines[-1] += f"  <- {truncated} cut at max_length"
    return "\n".join(lines)


def run_checks(tokenizer: Any, template: Template, records: Sequence[dict], examples: Sequence[Encoded],
               max_length: int, assistant_turns: str = "all") -> list[Finding]:
    """Every dataset-wide check, in the order they are printed."""
    return [
        check_trained_tokens(examples),
        check_truncation(examples, max_length),
        check_eos_trained(examples, tokenizer.eos_token_id),
        check_template_roundtrip(tokenizer, template, records, examples, assistant_turns),
    ]


# I/O edge -----------------------------------------------------------------------------------------

def save_histogram_png(lengths: Sequence[int], max_length: int, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(list(lengths), bins=min(50, max(10, len(set(lengths)))), range=(0, max_length), color="C0")
    ax.axvline(max_length, color="C3", linestyle="--", label=f"data.max_length = {max_length}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(Path(path), buffer.getvalue())


def run(cfg: ExperimentConfig, num_examples: int = 3) -> list[Finding]:
    """Print rendered examples and the checks for ``cfg``'s selected records; save the length histogram.

    Raises LoralabError after printing when a check finds an error.
    """
    data_format, records = read_format(read_records(cfg.data.path, cfg.data.split), cfg.data.format, cfg.data.columns,
                                       cfg.data.path)
    if not records:
        raise DataError(f"{cfg.data.path} holds no records")
    if cfg.data.dedupe:  # as prepare draws its split: exact duplicates dropped first
        records = dedupe(records)
    train_idx, eval_idx = select_and_split(len(records), cfg.data.num_examples, cfg.data.eval_size, cfg.data.seed)
    selected = [records[i] for i in train_idx + eval_idx]  # training examples first, in prepare's order
    tokenizer = load_tokenizer(cfg.model)
    template = make_template(tokenizer, cfg.data.template, data_format)
    turns = cfg.data.assistant_turns
    try:
        examples = [encode_example(tokenizer, template, r, cfg.data.max_length, turns) for r in selected]
    except DataError as err:
        raise DataError(f"inspect: cannot render the records with the {template.kind} template: {err}") from None

    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")  # https://no-color.org
    legend = f"{ANSI_TRAINED}trained{ANSI_RESET}" if color else f"{PLAIN_OPEN}trained{PLAIN_CLOSE}"
    print(f"inspect: {len(selected)} {data_format} examples ({len(train_idx)} train, {len(eval_idx)} eval), "
          f"{template.kind} template, "
          f"data.max_length={cfg.data.max_length}; {legend} tokens are the ones the loss sees")
    for k, ex in enumerate(examples[:num_examples]):
        n_trained = trained_token_count(ex.labels)
        print(f"\n--- example {k}: {len(ex.input_ids)} tokens, {n_trained} trained, "
              f"{'truncated' if ex.truncated else 'complete'}")
        print(render_example(tokenizer, ex.input_ids, ex.labels, color))

    findings = run_checks(tokenizer, template, selected, examples, cfg.data.max_length, turns)
    print("\nchecks:")
    for f in findings:
        print(f"  [{f.status.upper():<7}] {f.check}: {f.message}")

    lengths = [len(ex.input_ids) for ex in examples]
    print(f"\nlength histogram (tokens after truncation; longest {max(lengths)}, "
          f"data.max_length {cfg.data.max_length}):")
    print(format_histogram(length_histogram(lengths, cfg.data.max_length), sum(ex.truncated for ex in examples)))
    png = RunDir(cfg).root / "length_histogram.png"
    save_histogram_png(lengths, cfg.data.max_length, png)
    print(f"saved {png}")

    errors = [f for f in findings if f.status == "error"]
    if errors:
        raise LoralabError(f"inspect found {len(errors)} problem(s): {', '.join(f.check for f in errors)} "
                           "(details above)")
    return findings
