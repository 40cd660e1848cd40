"""Every rule that decides how a run trains, in one place: row tokens, examples per process, the checks on
switches, and "auto" gradient checkpointing and oneDNN weights decided by asking planning whether a candidate fits.
Train, plan, inspect and the benches ask here; precision per device is loralab.precision's rule.

Values in, values out: the caller reads config.json and probes the device, and prints the notes a decision returns.
No torch import at module level: `loralab plan` must stay cheap to import.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import TYPE_CHECKING

from loralab.cpu.catalogue import FAST_ROW_ACTIVATION_BYTES, LEAN_ALLOCATOR_ROW_TOKENS, LONG_ROW_TOKENS, training_pieces
from loralab.data import trained_token_count
from loralab.errors import LoralabError
from loralab.packing import peak_row
from loralab.planning.inputs import PlanInputs
from loralab.planning.measure import profile_for
from loralab.planning.memory import DTYPE_BYTES, layer_activation_bytes
from loralab.planning.plan import Plan, Suggestion, plan_for
from loralab.planning.profiles import native_bf16
from loralab.planning.shapes import lora_modules, model_shape
from loralab.precision import choose_precision
from loralab.switches import Switches

if TYPE_CHECKING:
    from loralab.config import ExperimentConfig, TrainConfig
    from loralab.devices import DeviceFacts


# Rows ----------------------------------------------------------------------------------------------

def example_lengths(examples: list[dict]) -> tuple[list[int], list[int]]:
    """(token counts, trained-target counts: data.trained_token_count) of encoded examples."""
    lengths = [len(e["input_ids"]) for e in examples]
    trained = [trained_token_count(e["labels"]) for e in examples]
    return lengths, trained


def resolve_row_tokens(train: TrainConfig, device: str, lengths: list[int], precision: str = "bf16",
                       native_bf16: bool = True, fast_rows: int = LEAN_ALLOCATOR_ROW_TOKENS) -> int:
    """train.row_tokens with "auto" decided: on a CPU the row length its catalogue entry names for this CPU kind and
    precision (cpu.catalogue), or LONG_ROW_TOKENS where rows that long are fast (``fast_rows``: fast_row_tokens);
    the longest example elsewhere (data.max_length bounds it)."""
    if train.row_tokens != "auto":
        return int(train.row_tokens)
    if device != "cpu":
        return max(lengths)
    return LONG_ROW_TOKENS if fast_rows >= LONG_ROW_TOKENS else training_pieces(precision, native_bf16).row_tokens


def fullest_row_tokens(train: TrainConfig, device: str, lengths: list[int], precision: str = "bf16",
                       native_bf16: bool = True, fast_rows: int = LEAN_ALLOCATOR_ROW_TOKENS) -> int:
    """Tokens in the fullest row (packing.peak_row) ``train``'s steps can make on ``device``."""
    per_step = train.per_device_train_batch_size * train.gradient_accumulation_steps
    row_tokens = resolve_row_tokens(train, device, lengths, precision, native_bf16, fast_rows)
    return sum(lengths[i] for i in peak_row(lengths, per_step, row_tokens))


def fast_row_tokens(inputs: PlanInputs, switches: Switches) -> int:
    """Rows of up to how many tokens keep glibc's heap (cpu.allocator.lean) and may take oneDNN weights on a CPU:
    LONG_ROW_TOKENS where the activations autograd keeps for a row that long (planning's per-token estimate, every
    layer, with the CPU pieces ``switches`` turn on) fit cpu.catalogue.FAST_ROW_ACTIVATION_BYTES, else
    LEAN_ALLOCATOR_ROW_TOKENS; that too off a CPU, without the model's config.json, or where the plan cannot read the
    model (not Llama-style, unknown target modules: what needs the plan says so itself, and so does loading)."""
    if switches.cpu_pieces is None or not inputs.model_config:
        return LEAN_ALLOCATOR_ROW_TOKENS
    try:
        shape = model_shape(inputs.model_config)
        lora_modules(shape, inputs.lora)  # the target modules are the model's
    except LoralabError:
        return LEAN_ALLOCATOR_ROW_TOKENS
    per_token = shape.num_layers * layer_activation_bytes(shape, inputs, switches, DTYPE_BYTES[switches.precision])
    return LONG_ROW_TOKENS if LONG_ROW_TOKENS * per_token <= FAST_ROW_ACTIVATION_BYTES else LEAN_ALLOCATOR_ROW_TOKENS


def per_process_examples(train: TrainConfig, processes: int) -> int:
    """Examples each of ``processes`` trains per optimizer step, so that all of them together see the recipe's
    per_device_train_batch_size x gradient_accumulation_steps (the effective batch does not grow with processes)."""
    per_step = train.per_device_train_batch_size * train.gradient_accumulation_steps
    if processes > per_step:
        raise LoralabError(
            f"{processes} processes are more than the examples of an optimizer step ({per_step} = train."
            f"per_device_train_batch_size x train.gradient_accumulation_steps); launch at most {per_step} processes "
            f"(--nproc_per_node / --num_processes) or raise train.gradient_accumulation_steps")
    if per_step % processes:
        raise LoralabError(f"the {per_step} examples of an optimizer step do not split evenly over {processes} "
                           f"processes; launch a number of processes that divides {per_step}, or change "
                           f"train.gradient_accumulation_steps")
    return per_step // processes


# Switches ------------------------------------------------------------------------------------------

ONEDNN_PRECISIONS = ("bf16", "fp32")  # the precisions whose frozen weights loralab.cpu.onednn_weights can hold


def can_use_onednn_weights(device: str, precision: str, peak_tokens: int, checkpointing: bool,
                            fast_rows: int = LEAN_ALLOCATOR_ROW_TOKENS) -> bool:
    """Whether train.onednn_weights "auto" may turn on: bf16 or fp32 on a CPU, rows of up to ``fast_rows``
    (fast_row_tokens: the rows that trade memory for speed, as the allocator does) and no checkpointing (which says
    memory is short)."""
    return (device == "cpu" and precision in ONEDNN_PRECISIONS and peak_tokens <= fast_rows
            and not checkpointing)


def check_bitsandbytes(load_in_4bit: bool, optim: str, device: str) -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes; the 8-bit optimizer needs bitsandbytes."""
    if load_in_4bit and device != "cuda":
        raise LoralabError(f"train.load_in_4bit (QLoRA) needs a CUDA GPU and this run is on {device}; "
                           f"set train.load_in_4bit: false")
    missing = importlib.util.find_spec("bitsandbytes") is None
    if load_in_4bit and missing:
        raise LoralabError("train.load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes "
                           "(or set train.load_in_4bit: false)")
    if optim == "adamw_bnb_8bit" and missing:
        raise LoralabError("train.optim adamw_bnb_8bit needs bitsandbytes: pip install bitsandbytes "
                           "(or set train.optim: adamw_torch)")


def check_switches(cfg: ExperimentConfig, device: str, precision: str | None = None,
                   onednn_available: bool = True) -> None:
    """train.liger_kernels and train.torch_compile are for CUDA GPUs (Liger needs its package);
    train.onednn_weights: true is for bf16 or fp32 on a CPU whose PyTorch has oneDNN (checked once ``precision`` is
    known); QLoRA and the 8-bit optimizer need bitsandbytes (QLoRA a CUDA GPU)."""
    check_bitsandbytes(cfg.train.load_in_4bit, cfg.train.optim, device)
    for key, on in (("liger_kernels", cfg.train.liger_kernels), ("torch_compile", cfg.train.torch_compile)):
        if on and device != "cuda":
            raise LoralabError(f"train.{key} is for CUDA GPUs and this run trains on {device}; set train.{key}: false")
    if cfg.train.liger_kernels and importlib.util.find_spec("liger_kernel") is None:
        raise LoralabError("train.liger_kernels needs the liger-kernel package: pip install liger-kernel "
                           "(or set train.liger_kernels: false)")
    if cfg.train.onednn_weights is True and precision is not None and (
        device != "cpu" or precision not in ONEDNN_PRECISIONS or not onednn_available
    ):
        raise LoralabError(f"train.onednn_weights is for bf16 or fp32 training on a CPU with oneDNN, and this run "
                           f"trains on {device} in {precision}; set train.onednn_weights: auto")


def needs_estimate(train: TrainConfig, device: str, onednn_available: bool) -> bool:
    """Whether deciding the switches asks planning (and so needs the model's config.json): gradient checkpointing
    "auto"; on a CPU, oneDNN weights "auto" where they could turn on, or row tokens "auto" (fast_row_tokens)."""
    onednn_auto = train.onednn_weights == "auto" and onednn_available
    return train.gradient_checkpointing == "auto" or (device == "cpu" and (onednn_auto or train.row_tokens == "auto"))


def decide_for(inputs: PlanInputs, precision: str, onednn_available: bool = True) -> Switches:
    """Every switch of training ``inputs`` on ``inputs.profile``'s device in ``precision``. "auto" gradient
    checkpointing and oneDNN weights take the fastest setting that fits, in this order: oneDNN weights without
    checkpointing (where can_use_onednn_weights), plain weights without checkpointing, checkpointing with plain
    weights; the last when none fits."""
    train, profile = inputs.train, inputs.profile
    device, native = profile.kind, native_bf16(profile)
    pieces = training_pieces(precision, native) if device == "cpu" else None
    base = Switches(
        device=device, precision=precision, row_tokens=0, longest_row_tokens=0,
        gradient_checkpointing=bool(train.gradient_checkpointing), onednn_weights=bool(train.onednn_weights),
        liger_kernels=train.liger_kernels, torch_compile=train.torch_compile, cpu_pieces=pieces,
        per_example_attention=pieces is not None and pieces.per_example_attention
        and inputs.attn_implementation == "sdpa",
    )
    fast = fast_row_tokens(inputs, base)
    base = base._replace(
        row_tokens=resolve_row_tokens(train, device, inputs.lengths, precision, native, fast),
        longest_row_tokens=fullest_row_tokens(train, device, inputs.lengths, precision, native, fast),
        fast_row_tokens=fast,
    )
    onednn_auto = train.onednn_weights == "auto"
    onednn_choices = ([True, False] if onednn_available else [False]) if onednn_auto else [base.onednn_weights]
    checkpointing_choices = [False, True] if train.gradient_checkpointing == "auto" else [base.gradient_checkpointing]
    candidates = [
        base._replace(gradient_checkpointing=checkpointing, onednn_weights=onednn)
        for checkpointing in checkpointing_choices for onednn in onednn_choices
        if not (onednn and onednn_auto
                and not can_use_onednn_weights(device, precision, base.longest_row_tokens, checkpointing, fast))
    ]
    for candidate in candidates[:-1]:
        if plan_for(inputs, candidate).fits:
            return candidate
    return candidates[-1]


def switch_notes(requested: TrainConfig, switches: Switches) -> list[str]:
    """What the plan says about the switches "auto" decided."""
    notes = []
    if requested.gradient_checkpointing == "auto":
        notes.append("gradient_checkpointing auto: " + ("on, the run does not fit without it"
                                                        if switches.gradient_checkpointing
                                                        else "off, the run fits without it"))
    if requested.onednn_weights == "auto":
        notes.append("onednn_weights auto: " + ("on, frozen weights in oneDNN's layout for the matmuls"
                                                if switches.onednn_weights
                                                else "off (needs bf16 or fp32 on a CPU, rows of up to "
                                                f"{switches.fast_row_tokens:,} tokens, no checkpointing, and the "
                                                f"memory)"))
    return notes


def decide_switches(cfg: ExperimentConfig, facts: DeviceFacts, lengths: list[int], trained: list[int],
                    model_config: dict | None, onednn_available: bool = True) -> Switches:
    """Every switch of a run of ``cfg`` on the device ``facts`` describe, for training examples of these lengths
    and trained counts. ``model_config`` (config.json) is needed where needs_estimate says so, else may be None;
    ``onednn_available``: whether this PyTorch has oneDNN's weight ops (devices.onednn_available)."""
    device = facts.kind
    precision = choose_precision(facts, cfg.train.precision)
    onednn_available = device == "cpu" and onednn_available
    check_switches(cfg, device, precision, onednn_available)
    profile = profile_for(facts, calibrate=False)  # memory decides the switches, not time: nothing measured
    inputs = PlanInputs(model_config or {}, cfg.lora, cfg.train, lengths, profile, trained,
                        cfg.model.attn_implementation)
    if needs_estimate(cfg.train, device, onednn_available) and model_config is None:
        raise ValueError("decide_switches needs the model's config.json to decide an \"auto\" switch")
    switches = decide_for(inputs, precision, onednn_available)
    if switches.gradient_checkpointing and cfg.train.gradient_checkpointing == "auto":
        switches = switches._replace(notes=(
            f"the estimate says this run would not fit {profile.description} without gradient checkpointing; "
            f"turning it on (more compute; `loralab plan CONFIG` shows the figures)",))
    return switches


# Plans ---------------------------------------------------------------------------------------------

def plan_run(inputs: PlanInputs, precision: str, with_suggestions: bool = True) -> Plan:
    """Decide every switch of ``inputs`` on its profile's device (decide_for), then plan the run on them; where it
    does not fit, with the single changes that would make it fit (suggest)."""
    if not inputs.lengths:
        raise LoralabError("plan needs at least one training example length")
    switches = decide_for(inputs, precision)
    plan = plan_for(replace(inputs, notes=inputs.notes + switch_notes(inputs.train, switches)), switches)
    if with_suggestions and not plan.fits:
        plan.suggestions = suggest(inputs, precision, switches.row_tokens)
    return plan


def truncate_lengths(lengths: list[int], trained: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Lengths and trained counts after cutting examples to ``max_length`` (prepare cuts from the response end)."""
    cut = [min(n, max_length) for n in lengths]
    kept = [max(0, t - (n - c)) for n, t, c in zip(lengths, trained, cut, strict=False)]
    return cut, kept


def suggest(inputs: PlanInputs, precision: str, row_tokens: int) -> list[Suggestion]:
    """Single changes that make the run fit, each with its predicted peak; all of them at once if none does alone.
    ``row_tokens``: the row length decided for ``inputs`` (shorter rows are the first change tried)."""
    lengths, trained, train, profile = inputs.lengths, inputs.trained, inputs.train, inputs.profile

    def trial(settings: list[str], note: str, train_: TrainConfig, lengths_=lengths, trained_=trained,
              precision_=precision) -> Suggestion:
        changed = replace(inputs, train=train_, lengths=lengths_, trained_counts=trained_)
        p = plan_run(changed, precision_, with_suggestions=False)
        return Suggestion(settings, note, p.peak_bytes, p.fits, p.microbatch_seconds)

    def first_fit(trials: list[Suggestion]) -> Suggestion | None:
        """The first (mildest) change that fits, else the strongest one tried."""
        return next((t for t in trials if t.fits), trials[-1] if trials else None)

    def shorter(settings: list[str], note: str, train_: TrainConfig, precision_: str) -> list[Suggestion]:
        trials = []
        for new_max in (2**k for k in range(15, 5, -1)):  # powers of two below the longest example
            if new_max < max(lengths):
                cut, kept = truncate_lengths(lengths, trained, new_max)
                n_cut = sum(n > new_max for n in lengths)
                trials.append(trial(settings + [f"data.max_length={new_max}"],
                                    f"{note}cuts {n_cut} of {len(lengths)} examples; run prepare again", train_, cut,
                                    kept, precision_))
        return trials

    out: list[Suggestion | None] = []
    fewer = [2**k for k in range(14, 6, -1) if 2**k < row_tokens and 2**k >= min(lengths)]
    out.append(first_fit([
        trial([f"train.row_tokens={n}"], "same examples per optimizer step, in more, shorter rows",
              replace(train, row_tokens=n))
        for n in fewer
    ]))
    if train.onednn_weights is True:
        out.append(trial(["train.onednn_weights=false"], "one copy of the linear weights less, somewhat slower",
                         replace(train, onednn_weights=False)))
    if not train.gradient_checkpointing:
        out.append(trial(["train.gradient_checkpointing=true"], "more compute: each layer's forward runs twice",
                         replace(train, gradient_checkpointing=True)))
    lower = next((p for p in ("bf16", "fp16") if p in profile.peak_flops), None)
    if DTYPE_BYTES[precision] > 2 and lower:
        out.append(trial([f"train.precision={lower}"], "16-bit base weights and activations", train, precision_=lower))
    out.append(first_fit(shorter([], "", train, precision)))
    found = [s for s in out if s is not None]
    if not any(s.fits for s in found):
        shortest = min(lengths)
        combo = replace(train, row_tokens=shortest, gradient_checkpointing=True)  # one example per row
        settings = [f"train.row_tokens={shortest}", "train.gradient_checkpointing=true"]
        combo_precision = lower if DTYPE_BYTES[precision] > 2 and lower else precision
        if combo_precision != precision:
            settings.append(f"train.precision={combo_precision}")
        trials = [trial(settings, "all together", combo, precision_=combo_precision)]
        trials += shorter(settings, "all together; ", combo, combo_precision)
        found.append(first_fit(trials))
    return found
