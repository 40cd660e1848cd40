"""The model card (README.md) of an adapter or a merged model, with every number read from the run directory.

`card_text` is pure (values in, Markdown out); `write` gathers the values from the run and writes the file.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from loralab.config import ExperimentConfig, ModelConfig
from loralab.data import adds_bos, make_template
from loralab.files import atomic_write_text, read_jsonl
from loralab.models.adapters import require_adapter, resolve_target
from loralab.models.gguf import SOURCE_FILE, model_source
from loralab.models.loading import load_tokenizer, resolve_model_source
from loralab.runs.layout import RunDir
from loralab.sources import looks_local

METRIC_NAMES = {"bleu": "BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
                "eval_loss": "held-out loss", "perplexity": "perplexity"}


def base_license(model_source: str) -> str | None:
    """The ``license:`` of a local base model's own model card front matter, if it has one."""
    readme = Path(model_source).expanduser() / "README.md"
    if not readme.is_file():
        return None
    front = re.match(r"---\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.DOTALL)
    found = re.search(r"^license:\s*(\S+)", front.group(1), re.MULTILINE) if front else None
    return found.group(1).strip("'\"") if found else None


# The keys of loralab_source.json (and of the manifest's copy, model_source) that name the model's hub id:
# `loralab fetch --source hub` writes hub_id; from PyPI, the GGUF's original is hub_id_of_original.
HUB_ID_KEYS = ("hub_id", "hub_id_of_original")


def recorded_hub_id(source: object) -> str | None:
    """The hub id a loralab_source.json record names, if it names one."""
    if not isinstance(source, dict):
        return None
    for key in HUB_ID_KEYS:
        value = source.get(key)
        if isinstance(value, str) and value and not looks_local(value):
            return value
    return None


def is_hub_id(model: ModelConfig) -> bool:
    """Whether model.name_or_path is a hub id (not a local folder or GGUF file), as resolve_model_source reads it."""
    name = model.name_or_path
    return not model.gguf_file and not looks_local(name) and not Path(name).expanduser().exists()


def resolve_base_model(model: ModelConfig, folder: str | None, manifest: dict) -> tuple[str, str]:
    """The card's ``base_model`` and a sentence on where the trained-on weights came from ("" when none is needed).

    The hub id when one is known: model.name_or_path itself, else the one the model folder's loralab_source.json
    records, else the run manifest's copy of it (model_source). Only when none is known, the local path, and
    the sentence says its hub id is unknown.
    """
    name = model.name_or_path
    if is_hub_id(model):
        return name, ""
    sources = [model_source(folder) if folder else None, manifest.get("model_source")]
    for source in sources:
        if (hub_id := recorded_hub_id(source)) is None:
            continue
        note = f"loralab trained it on `{name}`, a local copy of `{hub_id}`"
        gguf = source.get("gguf")
        if isinstance(gguf, dict):
            note += (f" de-quantised from the GGUF file `{gguf.get('file')}` ({gguf.get('quantization')}), "
                     "so its weights differ slightly from the hub's")
        return hub_id, note + "."
    kind = "file" if Path(name).expanduser().is_file() else "folder"
    return name, (f"The base model is a local {kind}, `{name}`, whose hub id is unknown (no {SOURCE_FILE} names "
                  "one): set `base_model` above to the hub id before publishing this card.")


def read_eval_table(path: Path) -> list[tuple[str, str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [(row["metric"], row["base"], row["lora"]) for row in csv.DictReader(f)]


def final_train_loss(path: Path) -> float | None:
    if not path.is_file():
        return None
    losses = [row.get("loss") for row in read_jsonl(path)]
    losses = [x for x in losses if x is not None]
    return losses[-1] if losses else None


def transformers_snippet(model_ref: str, base: str, adapter_ref: str | None, bos_first: bool) -> str:
    """Python that prompts the model exactly as loralab trained it (chat template, then the BOS rule)."""
    load = (f'model = AutoModelForCausalLM.from_pretrained("{model_ref}")\n'
            if adapter_ref is None else
            f'model = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(model, "{adapter_ref}")\n')
    imports = "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    if adapter_ref is not None:
        imports += "from peft import PeftModel\n"
    tok_ref = model_ref if adapter_ref is None else base
    bos = ("# loralab trained with the BOS token first and the chat template does not write it:\n"
           "ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids\n"
           if bos_first else
           "# The chat template writes every special token itself: add none.\n"
           "ids = tok(text, add_special_tokens=False).input_ids\n")
    return (
        "```python\nimport torch\n" + imports
        + f'tok = AutoTokenizer.from_pretrained("{tok_ref}")\n' + load
        + 'messages = [{"role": "user", "content": "What is the capital of France?"}]\n'
        + "text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n"
        + bos
        + "out = model.generate(torch.tensor([ids]), max_new_tokens=128, do_sample=False)\n"
        + "print(tok.decode(out[0, len(ids):], skip_special_tokens=True))\n```\n"
        + "\nDo not use `apply_chat_template(..., return_tensors=\"pt\")` alone"
        + (": it adds no BOS, and the model was trained with one.\n" if bos_first else ".\n")
    )


def card_text(info: dict) -> str:
    """The card's Markdown from plain values (see `write` for the keys)."""
    library = "transformers" if info["merged"] else "peft"
    front = ["---", f"base_model: {info['base_model']}", f"library_name: {library}"]
    if info.get("license"):
        front.append(f"license: {info['license']}")
    front += ["tags:", "- loralab", "- lora", "- peft", "- text-generation", "---", ""]
    lines = [f"# {info['name']}", "",
             f"LoRA fine-tune of `{info['base_model']}` made with loralab"
             + (" (the adapter merged into the base weights)." if info["merged"] else " (a PEFT adapter)."), ""]
    if info.get("base_note"):
        lines += [info["base_note"], ""]
    lines += ["## Data", "", f"- source: `{info['data_path']}`"]
    stats = info.get("stats") or {}
    for split in ("train", "eval"):
        if split in stats:
            s = stats[split]
            lines.append(f"- {split}: {s.get('examples')} examples, {s.get('tokens')} tokens "
                         f"({s.get('trained_tokens')} trained)")
    lines += [f"- max length {info['max_length']} tokens, template `{info['template']}`, response-only loss", ""]
    lines += ["## LoRA and training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info["settings"].items()]
    lines += ["", "## Evaluation", ""]
    if info["eval"]:
        lines += ["Greedy answers to the held-out prompts, scored against the references.", "",
                  "| metric | base | LoRA |", "|---|---|---|"]
        lines += [f"| {METRIC_NAMES.get(m, m)} | {float(b):.4f} | {float(l):.4f} |" for m, b, l in info["eval"]]
    else:
        lines.append("Not evaluated yet (`loralab eval CONFIG`).")
    lines += ["", "## Use it", "", "### transformers" + ("" if info["merged"] else " + PEFT"), "",
              transformers_snippet(info["model_ref"], info["base_model"], info["adapter_ref"], info["bos_first"])]
    lines += ["### llama.cpp and Ollama", "",
              ("`loralab export-gguf` writes `model-f16.gguf`, `model-q8_0.gguf` and an Ollama `Modelfile` "
               "(chat template and stop token included):"), "",
              "```bash\nloralab export-gguf " + info["run_ref"] + "\n"
              "llama-cli -m " + info["run_ref"] + "/gguf/model-q8_0.gguf -cnv   # chat template from the file\n"
              "cd " + info["run_ref"] + "/gguf && ollama create my-finetune -f Modelfile\n"
              "ollama run my-finetune\n```", ""]
    return "\n".join(front + lines)


def gather(cfg: ExperimentConfig, merged_dir: Path | None) -> dict:
    """The card's values, read from the run directory and the config."""
    rundir = RunDir(cfg)
    tokenizer = load_tokenizer(cfg.model)
    template = make_template(tokenizer, cfg.data.template)
    sample = template.prompt_text({"instruction": "Hi", "input": "", "output": ""})
    manifest = rundir.manifest()
    settings = {"r": cfg.lora.r, "lora_alpha": cfg.lora.lora_alpha, "lora_dropout": cfg.lora.lora_dropout,
                "target_modules": ", ".join(cfg.lora.target_modules)}
    t = cfg.train
    settings.update({"optimizer steps": t.max_steps,
                     "examples per step": t.per_device_train_batch_size * t.gradient_accumulation_steps,
                     "learning rate": t.learning_rate,
                     "scheduler": f"{t.lr_scheduler_type}, {t.warmup_steps} warm-up steps",
                     "precision": manifest.get("precision", t.precision), "device": manifest.get("device", t.device)})
    if (params := manifest.get("parameters")) is not None:
        settings["trainable parameters"] = f"{params['trainable']:,} of {params['total']:,}"
    if (loss := final_train_loss(rundir.metrics_file)) is not None:
        settings["final training loss"] = f"{loss:.4f}"
    if (wall := manifest.get("stages", {}).get("train", {}).get("wall_s")) is not None:
        settings["training time"] = f"{wall:.0f} s"
    stats = json.loads(rundir.stats_file.read_text(encoding="utf-8")) if rundir.stats_file.is_file() else {}
    folder = resolve_model_source(cfg.model)
    base_model, base_note = resolve_base_model(cfg.model, None if is_hub_id(cfg.model) else folder, manifest)
    return {
        "name": cfg.name, "merged": merged_dir is not None, "base_model": base_model, "base_note": base_note,
        "license": base_license(folder), "data_path": cfg.data.path, "stats": stats,
        "max_length": cfg.data.max_length, "template": template.kind, "settings": settings,
        "eval": read_eval_table(rundir.eval_results_file), "bos_first": adds_bos(tokenizer, sample),
        "model_ref": str(merged_dir), "adapter_ref": None if merged_dir is not None else str(rundir.adapter_dir),
        "run_ref": str(rundir.root),
    }


def write(cfg: ExperimentConfig, path: Path, merged_dir: Path | None = None) -> Path:
    """Write the card to ``path``: the adapter's, or with ``merged_dir`` the merged model's (named by that path)."""
    atomic_write_text(path, card_text(gather(cfg, merged_dir)))
    return path


def run(target: str, overrides: list[str] | None = None) -> Path:
    """`loralab card`: (re)write <run>/adapter/README.md from the run directory."""
    tgt = resolve_target(target, overrides)
    adapter = require_adapter(tgt, "card")
    path = write(tgt.cfg, adapter / "README.md")
    print(f"card: {path}")
    return path
