"""Model/tokenizer loading with clear errors, and LoRA through PEFT."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loralab.config import ConfigError, LoraSection, ModelConfig
from loralab.errors import LoralabError, first_sentence
from loralab.hub import prepare_hub_access, why_not_loaded
from loralab.models.gguf import cached_model_folder
from loralab.sources import looks_local

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_model_source(model: ModelConfig) -> str:
    """A local directory (checked), a GGUF file's de-quantised folder, or a hub id (left for from_pretrained)."""
    path = Path(model.name_or_path).expanduser()
    if model.gguf_file or path.suffix == ".gguf":
        return str(cached_model_folder(path / model.gguf_file if model.gguf_file else path))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise LoralabError(f"model path {path} is not a model folder (no config.json); "
                               "point model.name_or_path at one")
        return str(path)
    if looks_local(model.name_or_path):
        raise LoralabError(f"model path {model.name_or_path} does not exist; "
                           "set model.name_or_path to a model folder or a hub id")
    prepare_hub_access()
    return model.name_or_path


def _hub_error(name: str, err: Exception) -> LoralabError:
    return LoralabError(
        f"cannot load '{name}' from the Hugging Face Hub ({why_not_loaded(err)}); check the id, or download it where "
        f"the hub is reachable (`hf download {name} --local-dir DIR`) and set model.name_or_path: DIR"
    )


# Load errors that name a config value: the setting is wrong, not the model's files.
_ATTENTION = re.compile(r"attn_implementation|flash ?attention|flex[_ ]attention|attention implementation", re.I)
_MODEL_TYPE = re.compile(r"model type `([^`]*)` but Transformers does not recognize")


def _unknown_model_type(source: str, model_type: str) -> LoralabError:
    import transformers

    where = Path(source) / "config.json" if Path(source).is_dir() else f"the config.json of '{source}'"
    return LoralabError(f"{where} has model_type '{model_type}', an architecture transformers "
                        f"{transformers.__version__} does not know; correct model_type there if it is wrong, or "
                        f"upgrade transformers (`pip install -U transformers`) if the model is newer than it")


def _check_model_type(source: str) -> None:
    """A local model folder whose config.json names an architecture transformers does not know is refused before
    transformers reads it (it would warn, then fail as if the files were damaged)."""
    try:
        model_type = json.loads((Path(source) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # a hub id, or a damaged config.json: transformers' own error names it
    from transformers import CONFIG_MAPPING

    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
        raise _unknown_model_type(source, model_type)


def _config_cause(err: Exception, model: ModelConfig, source: str) -> LoralabError | None:
    """The config setting a load error is about, as that setting being wrong; None when it names none."""
    text = str(err)
    if found := _MODEL_TYPE.search(text):
        return _unknown_model_type(source, found.group(1))
    if _ATTENTION.search(text):
        return ConfigError(f"config key 'model.attn_implementation' is {model.attn_implementation!r}, which cannot "
                           f"load {source} here ({first_sentence(err)}); set it to \"sdpa\" (the default) or \"eager\"")
    return None


@contextlib.contextmanager
def _library_notes_held():
    """Hold back transformers' log lines and the warnings raised inside; pass them on only when the block succeeds.
    When it fails, loralab's one-line error says what is wrong: a library line printed before it would speak of
    the same thing less clearly, or of something else."""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger()  # transformers' root logger: its modules' loggers propagate to it
    held = logging.handlers.BufferingHandler(capacity=1 << 16)
    saved = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [held], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        logger.handlers, logger.propagate = saved
    for record in held.buffer:
        logger.handle(record)
    for w in caught:  # they passed the filters when raised: shown as they would have been
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    source = resolve_model_source(model)
    _check_model_type(source)
    try:
        with _library_notes_held():
            tokenizer = AutoTokenizer.from_pretrained(source, revision=model.revision)
    except Exception as err:  # noqa: BLE001 - damaged tokenizer files raise many types; all one line
        if cause := _config_cause(err, model, source):
            raise cause from None
        if source == model.name_or_path and not Path(source).exists():
            raise _hub_error(model.name_or_path, err) from None
        raise LoralabError(f"cannot load a tokenizer from {source} ({first_sentence(err)}); check or download its "
                           f"tokenizer files again") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss; any id will do, EOS is conventional.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: ModelConfig, precision: str, device: str, in_memory: bool = False, load_in_4bit: bool = False):
    """The base model with weights stored in the compute dtype (bf16/fp16 weights, not fp32 under autocast).

    ``in_memory``: read the weights into memory instead of mapping the checkpoint file. Mapped weights stay
    resident as long as any tensor of the file is alive, so weights released later (loralab.cpu.onednn_weights)
    would still count; read in, each is freed on its own (at the cost of the file's size again while loading).
    ``load_in_4bit``: QLoRA's NF4 base through bitsandbytes on the current CUDA device (check_bitsandbytes first).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(model)
    _check_model_type(source)
    extra: dict = {"disable_mmap": True} if in_memory else {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[precision])
        extra["device_map"] = {"": torch.cuda.current_device()}
    try:
        with _library_notes_held():
            net = AutoModelForCausalLM.from_pretrained(
                source, revision=model.revision, dtype=DTYPES[precision],
                attn_implementation=model.attn_implementation, **extra,
            )
    except Exception as err:  # noqa: BLE001 - truncated safetensors, refused pickles, shape errors: all one line
        if cause := _config_cause(err, model, source):
            raise cause from None
        if source == model.name_or_path and not Path(source).exists():
            raise _hub_error(model.name_or_path, err) from None
        raise LoralabError(f"cannot load a model from {source} ({first_sentence(err)}); its files are damaged, "
                           f"incomplete or unsafe (only safetensors and weights-only checkpoints load): download the "
                           f"model again") from None
    return net if load_in_4bit else net.to(device)  # a quantised model is placed by device_map


def lora_config(lora: LoraSection):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=list(lora.modules_to_save) or None,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def add_lora(model, lora: LoraSection):
    """Wrap ``model`` with fresh LoRA adapters; LoRA weights are kept in fp32 whatever the base dtype."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):  # QLoRA: norms in fp32, input gradients on (PEFT's recipe)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        return get_peft_model(model, lora_config(lora), autocast_adapter_dtype=True)
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise LoralabError(f"lora.target_modules {lora.target_modules} do not match this model "
                           f"({first_sentence(err)}); linear layers here: {', '.join(names)}") from None


@dataclass
class ParameterCounts:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total

    def as_dict(self) -> dict[str, Any]:
        return {"trainable": self.trainable, "total": self.total, "trainable_percent": round(self.percent, 4)}

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} of {self.total:,} ({self.percent:.2f}%)"


def count_parameters(model) -> ParameterCounts:
    """Trainable (LoRA) and total parameters; total excludes the LoRA ones, like the reference's count
    of the base model (PEFT's own print_trainable_parameters adds them)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return ParameterCounts(trainable=trainable, total=total - trainable)


def count_parameters_from_config(config, lora: LoraSection) -> ParameterCounts:
    """Parameter counts for a model config without allocating weights (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_parameters(add_lora(model, lora))


def read_model_config(model: ModelConfig) -> dict[str, Any]:
    """config.json of a local model folder, or the hub's through AutoConfig (no weights are read)."""
    source = resolve_model_source(model)
    if Path(source).is_dir():
        return json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source, revision=model.revision).to_dict()
    except (OSError, ValueError) as err:
        raise LoralabError(
            f"cannot read the config of '{source}' from the Hugging Face Hub ({why_not_loaded(err)}); download the "
            f"model where the hub is reachable (`hf download {source} --local-dir DIR`) and set model.name_or_path: DIR"
        ) from None
