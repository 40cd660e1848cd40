"""Finding a trained adapter and its base model, checking they belong together, and merging them.

Shared by the commands that use a fine-tune after training (merge, export-gguf, generate, chat, card).
A *target* on their command line is one of: an experiment YAML, a run directory (it holds the resolved
``config.yaml`` of its newest stage), or a plain model folder (a base model, or a merged one) with no adapter.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loralab.config import ExperimentConfig, ModelConfig, load_config
from loralab.errors import LoralabError, first_sentence
from loralab.models.loading import DTYPES, load_model, load_tokenizer, resolve_model_source
from loralab.runs.layout import CONFIG_FILE

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass
class Target:
    """What a command works on: a model, with or without a trained adapter on top."""

    model: ModelConfig
    """The base model (or a merged model folder when there is no run)."""
    cfg: ExperimentConfig | None = None
    """The experiment, when the target is a config or a run directory."""

    @property
    def run_dir(self) -> Path | None:
        return self.cfg.run_dir if self.cfg is not None else None

    @property
    def adapter_dir(self) -> Path | None:
        return self.run_dir / "adapter" if self.cfg is not None else None

    @property
    def label(self) -> str:
        return str(self.run_dir) if self.cfg is not None else self.model.name_or_path


def resolve_target(target: str | Path, overrides: list[str] | None = None) -> Target:
    """An experiment YAML, a run directory or a model folder -> Target (errors say which of them is missing)."""
    path = Path(target).expanduser()
    if path.is_file():
        return Target(model=(cfg := load_config(path, overrides, warn=False)).model, cfg=cfg)
    if (path / CONFIG_FILE).is_file():
        cfg = load_config(path / CONFIG_FILE, overrides, warn=False)
        # The run directory is where it is now, whatever output_dir said when it was trained.
        cfg = dataclasses.replace(cfg, output_dir=str(path.resolve().parent), name=path.resolve().name)
        return Target(model=cfg.model, cfg=cfg)
    if (path / "config.json").is_file():
        if overrides:
            raise LoralabError(f"{path} is a model folder, not an experiment: --set applies only to a config or a run")
        return Target(model=ModelConfig(name_or_path=str(path)))
    if not path.exists():
        raise LoralabError(f"{path} does not exist; give an experiment YAML, a run directory or a model folder")
    raise LoralabError(
        f"{path} is neither an experiment YAML, a run directory (config.yaml) nor a model folder (config.json)"
    )


def require_adapter(target: Target, for_command: str) -> Path:
    """The trained adapter folder of ``target``, or a one-line error saying how to get one."""
    if target.cfg is None:
        raise LoralabError(f"{for_command} needs a trained run; {target.label} is a model folder with no adapter")
    adapter = target.adapter_dir
    if not all((adapter / name).is_file() for name in ADAPTER_FILES):
        raise LoralabError(
            f"no trained adapter in {adapter}; "
            f"run `loralab train CONFIG` (or `loralab run CONFIG`) before {for_command}"
        )
    return adapter


def check_adapter_base(adapter_dir: Path, model: ModelConfig) -> None:
    """Refuse an adapter whose recorded base model is not ``model`` (a different path or hub id)."""
    try:
        adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        recorded = adapter_config.get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as err:
        raise LoralabError(f"cannot read {adapter_dir / 'adapter_config.json'} ({first_sentence(err)}); "
                           f"train again") from None
    if not recorded or _same_model(recorded, model.name_or_path):
        return
    raise LoralabError(
        f"the adapter in {adapter_dir} was trained on {recorded}, not on {model.name_or_path}; "
        f"set model.name_or_path to the model it was trained on"
    )


def check_adapter_shapes(adapter_dir: Path, config) -> None:
    """Refuse, before any weight is loaded, an adapter whose matrices do not fit the model ``config`` describes."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        modules = dict(AutoModelForCausalLM.from_config(config).named_modules())
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        # safe_open is not iterable: keys() is needed.
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    for key, shape in shapes.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        name = key.removeprefix("base_model.model.").split(".lora_")[0]
        module = modules.get(name)
        want = None if module is None else (
            module.in_features if ".lora_A." in key else module.out_features)
        got = shape[1] if ".lora_A." in key else shape[0]
        if want != got:
            found = "no such layer" if module is None else f"{want} features, the adapter has {got}"
            raise LoralabError(
                f"the adapter in {adapter_dir} was trained for another base model ({name}: {found}); "
                "set model.name_or_path to the model it was trained on"
            )


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the model's weights are stored in (config.json's dtype), float32 when it says nothing."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def parameter_count(config) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def load_base(model: ModelConfig, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) on the CPU in ``dtype``, with loralab's one-line loading errors."""
    precision = {v: k for k, v in DTYPES.items()}[dtype]
    return load_model(model, precision, "cpu"), load_tokenizer(model)


def attach_adapter(base, adapter_dir: Path):
    """``base`` wrapped by the adapter in ``adapter_dir`` (a PeftModel); shape mismatches are one-line errors."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:
        mismatch = next((line for line in str(err).splitlines() if "size mismatch" in line), None)
        detail = first_sentence(mismatch or err)
        raise LoralabError(
            f"the adapter in {adapter_dir} does not fit {base.name_or_path} ({detail}); "
            f"it was trained for another base model: set model.name_or_path to that model"
        ) from None


def checked_adapter(target: Target, for_command: str) -> Path:
    """The run's adapter folder, once its recorded base model and its matrix shapes match ``target.model``."""
    from transformers import AutoConfig

    adapter = require_adapter(target, for_command)
    check_adapter_base(adapter, target.model)
    config = AutoConfig.from_pretrained(resolve_model_source(target.model), revision=target.model.revision)
    check_adapter_shapes(adapter, config)
    return adapter


def load_merged(target: Target, for_command: str):
    """(merged model in the checkpoint's dtype, tokenizer): base weights + the adapter's update, merged in fp32.

    Merging in fp32 and rounding once to the checkpoint dtype keeps the update that a bf16 sum would round away.
    """
    from transformers import AutoConfig

    adapter = checked_adapter(target, for_command)
    config = AutoConfig.from_pretrained(resolve_model_source(target.model), revision=target.model.revision)
    base, tokenizer = load_base(target.model, torch.float32)
    merged = attach_adapter(base, adapter).merge_and_unload()
    return merged.to(checkpoint_dtype(config)), tokenizer
