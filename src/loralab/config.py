"""Typed experiment config: one YAML file per experiment, validated on load.

Precedence, lowest to highest: the defaults declared here < the YAML file < ``--set section.key=value``.
Field names follow PEFT (``lora``) and transformers (``train``) so a config maps 1:1 onto their objects.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from loralab.data import FORMAT_FIELDS
from loralab.errors import LoralabError

DEFAULT_EXAMPLE_PROMPTS = [
    "Write a short poem about the moon.",
    "Explain why the sky is blue in simple terms.",
    "Give 3 tips for studying effectively.",
    "Translate 'Good morning' to Spanish.",
    "Tell me a fun fact about elephants.",
]


class ConfigError(LoralabError):
    """A config file or override that cannot be used as written."""


@dataclass
class ModelConfig:
    name_or_path: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    """Hub model id, a local directory holding config.json, weights and tokenizer files, or a local .gguf file
    (de-quantised once and cached as a model folder; see loralab.models.gguf)."""
    gguf_file: str | None = None
    """A .gguf file inside the local folder name_or_path (the same as naming the file in name_or_path)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; ignored for local directories."""
    attn_implementation: str = "sdpa"
    """transformers attention backend: "sdpa" (default, fast on CPU and GPU), "eager", "flash_attention_2" (its
    flash_attn package, on a CUDA GPU), "flash_attention_3", "flash_attention_4", "flex_attention", "paged|eager", or
    a hub kernel ("org/repo"). Any other value is refused when the config loads."""


@dataclass
class DataConfig:
    path: str = "tatsu-lab/alpaca"
    """Hub dataset id, or a local data file in one of the formats of data.format: .json (a list of records),
    .jsonl (one record a line), .parquet or .csv (one record a row; every CSV cell is read as text). JSON may
    start with a UTF-8 BOM."""
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text"] = "auto"
    """Record format. "alpaca": ``instruction``, optional ``input``, ``output`` (loss on the output).
    "messages": ``messages``, a list of ``{role, content}`` with roles system (optional, first), user and
    assistant alternating (loss on the assistant turns, see assistant_turns). "sharegpt": ``conversations``,
    a list of ``{from, value}`` with from human, gpt or system. "prompt_completion": ``prompt`` and
    ``completion`` strings joined as they are (loss on the completion). "text": ``text`` (loss on all of it).
    Every trained part ends with the tokenizer's EOS. "auto": detected from the first records' fields (after
    data.columns); the format used is in the run's data/stats.json and manifest."""
    columns: dict[str, str] = field(default_factory=dict)
    """Field names of your data for loralab's names, e.g. ``{instruction: question, output: answer}`` or
    ``{messages: dialog}``; the names are those listed under data.format. Every mapped field must exist."""
    assistant_turns: Literal["all", "last"] = "all"
    """messages/sharegpt data: train on every assistant turn ("all") or only on the last one ("last")."""
    split: str = "train"
    """Split to read when ``path`` is a hub dataset."""
    num_examples: int | None = 1000
    """Size of the seeded random subset drawn from the source records; null uses every record."""
    eval_size: int = 50
    """Examples of the subset held out (seeded) for evaluation; the rest are trained on."""
    seed: int = 42
    """Seed of the subset draw and of the train/eval split."""
    max_length: int = 512
    """Longest example in tokens; longer ones are cut from the response end (the prompt is kept)."""
    template: Literal["auto", "chat", "alpaca"] = "auto"
    """How records become text: "chat" uses the tokenizer's chat template, "alpaca" the classic Alpaca
    prompt (see loralab.data), "auto" the chat template when the tokenizer has one."""
    dedupe: bool = False
    """Drop exact duplicate records before the subset draw and the split, keeping the first of each. Exact
    duplicates are records equal after reading their format and data.columns: the same fields with the same
    strings (so a missing Alpaca ``input`` equals an empty one; a difference in case or spacing makes them
    differ). Either way, data/stats.json counts the duplicates within the data and the held-out records that
    are copies of a training record, and prepare warns about the latter (they make held-out metrics
    measure memorisation)."""


@dataclass
class LoraSection:
    r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator: the update is scaled by lora_alpha / r."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    target_modules: list[str] | Literal["all-linear"] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear modules that get adapters (PEFT's target_modules); "all-linear": every linear layer
    of the decoder (not the LM head)."""
    use_dora: bool = False
    """DoRA (PEFT's use_dora): a trained magnitude per output feature on top of the LoRA direction; adds
    out_features parameters per adapted module and runs PEFT's own (slower) forward."""
    use_rslora: bool = False
    """rsLoRA (PEFT's use_rslora): scale the update by lora_alpha / sqrt(r) instead of lora_alpha / r."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters and saved with them (PEFT's modules_to_save), e.g.
    [lm_head, embed_tokens] after adding tokens."""


@dataclass
class TrainConfig:
    per_device_train_batch_size: int = 1
    """Examples per device per accumulation step. An optimizer step sees batch x accumulation examples
    per device; loralab lays them out in rows (row_tokens), so only that product changes what is trained."""
    gradient_accumulation_steps: int = 8
    """Accumulation steps per optimizer step (see per_device_train_batch_size)."""
    row_tokens: int | Literal["auto"] = "auto"
    """The most tokens in one forward and backward pass. An optimizer step's examples are packed end to end,
    best fit, into rows of at most this many tokens (an example longer than that gets a row alone); the
    gradients equal those of one example at a time. "auto": 1024 on a CPU (the fastest in
    bench/train_throughput.py), the longest training example (at most data.max_length) on GPUs and MPS.
    Lower it to save memory."""
    max_steps: int = 500
    """Optimizer steps to train."""
    learning_rate: float = 2e-4
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 50
    """Linear warm-up steps from 0 to learning_rate."""
    lr_scheduler_type: str = "linear"
    """transformers scheduler after warm-up, one of SCHEDULERS ("linear", "cosine", "constant_with_warmup", ...)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA parameters."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    logging_steps: int = 10
    """Log loss, grad norm and learning rate every this many optimizer steps."""
    save_steps: int = 100
    """Save a resumable checkpoint every this many optimizer steps."""
    save_total_limit: int = 2
    """Checkpoints kept on disk (the newest ones)."""
    seed: int = 42
    """Seed of LoRA initialisation, dropout and example order."""
    seeds: int = 1
    """`loralab run` and `loralab sweep`: train under this many seeds (train.seed, train.seed + 1, ...), each into its
    own run directory `<name>-seed<S>` sharing the prepared split, with mean ± sd over them in
    `<output_dir>/<name>-seeds.md` (--seeds N overrides it). The single stages (`loralab train`, ...) train under
    train.seed alone. Not part of any stage's hash."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision; "auto" picks per device (see loralab.precision.choose_precision)."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass: less memory, more compute (docs/training.md gives
    the cost).
    "auto": on only when `loralab plan`'s estimate says the run would not fit this device's memory without it."""
    onednn_weights: bool | Literal["auto"] = "auto"
    """CPU bf16 or fp32 only: keep the frozen linear weights in oneDNN's blocked layouts for the run (more tokens per
    second, +1x the linear weights in memory; loralab.cpu.onednn_weights). "auto": on when rows are at most
    1,024 tokens, checkpointing is off and `loralab plan`'s estimate says the copy fits in memory."""
    liger_kernels: bool = False
    """CUDA only: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) patched into the model through the Trainer's
    use_liger_kernel; needs `pip install liger-kernel`. Not measured by loralab (no GPU where it is built)."""
    torch_compile: bool = False
    """CUDA only: compile the model with torch.compile through the Trainer (the first steps are slow while it
    compiles). Not measured by loralab. On a CPU, loralab's own training path is used instead."""
    eval_loss_steps: int = 0
    """Compute the held-out loss every this many optimizer steps (0: only at the start and the end)."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    """Trackers fed through the Trainer's own integrations, besides metrics.jsonl (always written): "tensorboard"
    (event files in <run>/tensorboard/), "mlflow" (MLFLOW_TRACKING_URI, default <run>/mlruns), "wandb" (offline
    into <run>/wandb/ unless WANDB_API_KEY or WANDB_MODE is set). [] for none. Each needs its package installed."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to train; "auto" prefers CUDA, then MPS, then CPU."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base weights in 4-bit NF4 (double quantisation) through bitsandbytes, computing in
    train.precision; CUDA only, needs `pip install bitsandbytes`."""
    optim: Literal["adamw_torch", "adamw_bnb_8bit"] = "adamw_torch"
    """The Trainer's optimizer: AdamW, or bitsandbytes' 8-bit AdamW (optimizer states in 8 bits; needs bitsandbytes)."""


@dataclass
class EvalConfig:
    max_new_tokens: int = 128
    """Longest generated answer in tokens (greedy decoding)."""
    num_examples: int | None = None
    """Held-out examples to generate for; null uses the whole eval split."""
    batch_size: int | None = None
    """Prompts decoded together; null picks the largest that fits in available memory."""
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_EXAMPLE_PROMPTS))
    """Fixed prompts answered by base and LoRA for the before/after examples (examples.md)."""
    cache_base_generations: bool = True
    """Reuse the base model's generations and held-out loss across experiments with the same base, prompts
    (held-out examples) and settings."""
    bootstrap_resamples: int = 1000
    """Resamples of the held-out prompts for the 95% interval on each metric's change (a paired bootstrap: the
    same prompts drawn for base and LoRA; loralab.intervals)."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap's draws: the same seed, answers and resamples give the same intervals."""


@dataclass
class ExperimentConfig:
    name: str
    """Experiment name; the run directory is ``<output_dir>/<name>``."""
    output_dir: str = "outputs"
    """Parent folder of run directories (relative paths are resolved against the working directory)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_type_name(item)}"
    if origin is dict:
        key_type, item = typing.get_args(tp)
        return f"a mapping of {_type_name(key_type)} to {_type_name(item)}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


# Hand-written over the dataclasses (no pydantic): each field's docstring stays where it is declared, and every
# error names the dotted config key and what to set, in one line (tests/test_config.py).
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_coerce(v, item, key) for v in value]
    elif origin is dict:
        key_type, item = typing.get_args(tp)
        if isinstance(value, dict):
            return {_coerce(k, key_type, key): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads 2e-4 (no dot) as a string: accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the annotations above are used
        raise TypeError(f"unsupported annotation {tp!r}")
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    where = prefix or "the top level"
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{where}' must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if prefix == "train" and "packed_weights" in unknown:
        raise ConfigError("train.packed_weights is now called train.onednn_weights (same values); rename the key")
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; valid keys in {where}: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"config is missing required key '{(prefix + '.' if prefix else '') + missing[0]}'")
    return cls(**kwargs)


# transformers' schedulers that need no arguments beyond warm-up and the step count (the others need an
# evaluation loop or extra settings the Trainer would ask for only after training has started).
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)
# transformers' attention backends (its AttentionInterface, and "eager"); a hub kernel ("org/repo") is left to it.
ATTENTION_IMPLEMENTATIONS = (
    "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention", "paged|eager",
)


def _check_attention(value: str) -> None:
    """A backend transformers would refuse only once the model loads is refused here, as the setting it is."""
    if value not in ATTENTION_IMPLEMENTATIONS and "/" not in str(value):
        known = ", ".join(ATTENTION_IMPLEMENTATIONS)
        raise ConfigError(f"config key 'model.attn_implementation' must be one of {known} or a hub kernel (org/repo); "
                          f"got {value!r}")


def _check_values(cfg: ExperimentConfig) -> None:
    """Ranges, checked at load so no stage touches a file with a config it would fail on later."""
    positive = {
        "data.max_length": cfg.data.max_length,
        "lora.r": cfg.lora.r,
        "lora.lora_alpha": cfg.lora.lora_alpha,
        "train.learning_rate": cfg.train.learning_rate,
        "train.per_device_train_batch_size": cfg.train.per_device_train_batch_size,
        "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train.max_steps": cfg.train.max_steps,
        "train.logging_steps": cfg.train.logging_steps,
        "train.save_steps": cfg.train.save_steps,
        "train.seeds": cfg.train.seeds,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
        "eval.bootstrap_resamples": cfg.eval.bootstrap_resamples,
    }
    for key, value in positive.items():
        if not value > 0:  # also catches NaN
            zero_alpha = " (0 scales every LoRA update to nothing: nothing would be trained)"
            why = zero_alpha if key == "lora.lora_alpha" else ""
            raise ConfigError(f"config key '{key}' must be positive, got {value}{why}")
    not_negative = {
        "train.warmup_steps": cfg.train.warmup_steps,
        "train.weight_decay": cfg.train.weight_decay,
        "train.max_grad_norm": cfg.train.max_grad_norm,
        "train.eval_loss_steps": cfg.train.eval_loss_steps,
    }
    for key, value in not_negative.items():
        if not value >= 0:
            raise ConfigError(f"config key '{key}' must be 0 or more, got {value}")
    if cfg.train.save_total_limit < 1:
        raise ConfigError(f"config key 'train.save_total_limit' must be 1 or more (checkpoints kept), "
                          f"got {cfg.train.save_total_limit}")
    if cfg.train.lr_scheduler_type not in SCHEDULERS:
        raise ConfigError(f"config key 'train.lr_scheduler_type' must be one of {', '.join(SCHEDULERS)}; "
                          f"got {cfg.train.lr_scheduler_type!r}")
    _check_attention(cfg.model.attn_implementation)
    for key in ("num_examples", "batch_size"):
        value = getattr(cfg.eval, key)
        if value is not None and value < 1:
            raise ConfigError(f"config key 'eval.{key}' must be 1 or more, or null, got {value}")
    if cfg.train.row_tokens != "auto" and cfg.train.row_tokens <= 0:
        raise ConfigError(f"config key 'train.row_tokens' must be positive or \"auto\", got {cfg.train.row_tokens}")
    if cfg.data.num_examples is not None and cfg.data.num_examples <= 0:
        raise ConfigError(f"config key 'data.num_examples' must be positive or null, got {cfg.data.num_examples}")
    if cfg.data.eval_size < 0:
        raise ConfigError(f"config key 'data.eval_size' must be 0 or more, got {cfg.data.eval_size}")
    if not 0.0 <= cfg.lora.lora_dropout < 1.0:
        raise ConfigError(f"config key 'lora.lora_dropout' must be in [0, 1), got {cfg.lora.lora_dropout}")
    known = sorted({name for fields in FORMAT_FIELDS.values() for name in fields})
    for name in cfg.data.columns:
        if name not in known:
            raise ConfigError(f"config key 'data.columns' maps unknown field '{name}'; loralab's field names are "
                              f"{', '.join(known)}")
    if not cfg.lora.target_modules:
        raise ConfigError("config key 'lora.target_modules' must name at least one module")
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"config key 'name' must be a plain folder name, got {cfg.name!r}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_steps=10"`` -> (["train", "max_steps"], 10); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of the raw config mapping with each ``section.key=value`` applied."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{part}' is not a config section")
            node = child
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict) -> ExperimentConfig:
    cfg = _build(ExperimentConfig, raw, "")
    _check_values(cfg)
    return cfg


class ConfigWarning(UserWarning):
    """A setting that runs but would mislead: a run too short to judge, say. The CLI prints each as one line."""


MIN_LOSS_POINTS = 5  # logged training-loss rows below which a loss curve shows no trend
MIN_HELDOUT_EXAMPLES = 10  # held-out examples below which BLEU, ROUGE and the held-out loss say little


def run_warnings(cfg: ExperimentConfig) -> list[str]:
    """Why a run of ``cfg`` would be too short to judge, one line each: a warm-up the run never finishes, too few
    logged loss points for a curve, too few held-out examples for a metric. Empty when none applies."""
    t, found = cfg.train, []
    if t.warmup_steps >= t.max_steps:
        peak = t.learning_rate * max(t.max_steps - 1, 0) / t.warmup_steps
        found.append(f"train.warmup_steps {t.warmup_steps} >= train.max_steps {t.max_steps}: the learning rate never "
                     f"reaches train.learning_rate {t.learning_rate:g} (it stops at {peak:.2g}); set "
                     f"train.warmup_steps to about a tenth of max_steps ({max(t.max_steps // 10, 0)})")
    points = t.max_steps // t.logging_steps
    if points < MIN_LOSS_POINTS:
        fix = (f"set train.logging_steps to at most {t.max_steps // MIN_LOSS_POINTS}"
               if t.max_steps >= MIN_LOSS_POINTS else f"raise train.max_steps to {MIN_LOSS_POINTS} or more")
        found.append(f"train.logging_steps {t.logging_steps} logs {points} loss point{'s' * (points != 1)} in "
                     f"train.max_steps {t.max_steps}, too few to show a trend; {fix}")
    held_out = cfg.data.eval_size if cfg.eval.num_examples is None else min(cfg.data.eval_size, cfg.eval.num_examples)
    if 0 < held_out < MIN_HELDOUT_EXAMPLES:
        found.append(f"{held_out} held-out example{'s' * (held_out != 1)} (data.eval_size"
                     f"{', eval.num_examples' if cfg.eval.num_examples is not None else ''}): BLEU, ROUGE and the "
                     f"held-out loss on fewer than {MIN_HELDOUT_EXAMPLES} say little; hold out at least "
                     f"{MIN_HELDOUT_EXAMPLES}")
    return found


def load_config(path: str | Path, overrides: list[str] | None = None, warn: bool = True) -> ExperimentConfig:
    """Read, override and validate an experiment YAML file. With ``warn``, each run_warnings line is issued as a
    ConfigWarning (the CLI prints them as `loralab: warning: ...`; in Python they show as warnings do)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping (name: ..., model: ..., ...)")
    cfg = config_from_dict(apply_overrides(raw, overrides or []))
    if warn:
        for line in run_warnings(cfg):
            warnings.warn(line, ConfigWarning, stacklevel=2)
    return cfg


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
