"""The eval stage: greedy answers from the base model and from base + adapter, scored against references.

The base model is loaded once: it answers (or its cached answers are reused), then the adapter is
loaded onto it, its held-out loss measured, and it is merged into the weights so LoRA generation costs
no extra matmul per token.
"""

from __future__ import annotations

import csv
import io
import math
import time

import torch

from loralab import train
from loralab.config import ExperimentConfig
from loralab.data import make_template, prompt_ids, reference_answer
from loralab.errors import LoralabError
from loralab.generation import (
    generate_greedy,
    generation_cache_key,
    load_cached_generations,
    model_fingerprint,
    save_cached_generations,
)
from loralab.loss import heldout_loss
from loralab.metrics import example_scores, score_corpus
from loralab.modeling import choose_precision, detect_device, load_model, load_tokenizer
from loralab.rundir import (
    RunDir,
    atomic_write_text,
    read_jsonl,
    stage_hash,
    stage_inputs,
    write_jsonl,
)

METRICS = ("bleu", "rouge1", "rouge2", "rougeL")


def current_hash(cfg: ExperimentConfig, prints: dict[str, str] | None = None) -> str:
    return stage_hash(cfg, "eval", train.current_hash(cfg, prints))


def eval_results_csv(base: dict[str, float], lora: dict[str, float]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["metric", "base", "lora"])
    for name in base:
        writer.writerow([name, f"{base[name]:.6f}", f"{lora[name]:.6f}"])
    return out.getvalue()


def examples_markdown(prompts: list[str], base: list[str], lora: list[str]) -> str:
    parts = ["# Before and after\n", "Greedy answers to fixed prompts, from the base model and from base + LoRA.\n"]
    for i, (prompt, b, l) in enumerate(zip(prompts, base, lora), 1):
        parts.append(f"\n## {i}. {prompt}\n\n**Base:**\n\n{_quote(b)}\n\n**LoRA:**\n\n{_quote(l)}\n")
    return "".join(parts)


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def _data_format(rundir: RunDir) -> str:
    """The format prepare read the data as (data/stats.json; runs prepared before formats existed: alpaca)."""
    import json

    try:
        return json.loads(rundir.stats_file.read_text()).get("format", "alpaca")
    except (OSError, ValueError):
        return "alpaca"


def run(cfg: ExperimentConfig, force: bool = False) -> str:
    rundir = RunDir(cfg)
    prints = train.fingerprints(cfg)
    upstream = train.current_hash(cfg, prints)
    rundir.require_current("train", upstream, "eval", stage_inputs(cfg, "train", prints))
    expected = stage_hash(cfg, "eval", upstream)
    if not force and rundir.is_current("eval", expected):
        print(f"eval: up to date ({rundir.eval_results_file})")
        return expected
    _evaluate(cfg, rundir, expected, stage_inputs(cfg, "eval", prints))
    return expected


def _load_adapter(model, adapter_dir):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as err:  # noqa: BLE001 - PEFT raises RuntimeError (shapes), ValueError, KeyError, SafetensorError
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise LoralabError(f"cannot load the adapter in {adapter_dir} onto the base model ({first}); it was trained "
                           f"for "
                           f"another model or is damaged: run `loralab train CONFIG --force`") from None


def _evaluate(cfg: ExperimentConfig, rundir: RunDir, expected: str, inputs: dict) -> None:
    start = time.perf_counter()
    device = detect_device(cfg.train.device)
    precision = choose_precision(device, cfg.train.precision)
    tokenizer = load_tokenizer(cfg.model)
    template = make_template(tokenizer, cfg.data.template, _data_format(rundir))
    held_out = read_jsonl(rundir.eval_file)
    if not held_out:
        raise LoralabError(f"the eval split in {rundir.eval_file} is empty (data.eval_size {cfg.data.eval_size}): "
                           f"nothing to "
                           f"score; set data.eval_size to 1 or more and run `loralab run CONFIG`")
    if cfg.eval.num_examples is not None:
        held_out = held_out[: cfg.eval.num_examples]
    loss_examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in held_out]
    # Plain-text examples have no prompt to answer: they count in the held-out loss only.
    records = [e["record"] for e in held_out if reference_answer(e["record"]) is not None]
    references = [reference_answer(r) for r in records]
    fixed = [{"instruction": p, "input": "", "output": ""} for p in cfg.eval.prompts]
    # Held-out prompts first, then the fixed before/after prompts: one generation pass covers both.
    prompts = [prompt_ids(tokenizer, template, r) for r in records + fixed]
    gen = dict(
        max_new_tokens=cfg.eval.max_new_tokens,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        batch_size=cfg.eval.batch_size,
    )

    model = load_model(cfg.model, precision, device)
    settings = {"max_new_tokens": cfg.eval.max_new_tokens, "precision": precision, "device": device,
                "eos": gen["eos_token_ids"], "revision": cfg.model.revision}
    cache_key = generation_cache_key(model_fingerprint(cfg.model.name_or_path), prompts, settings)
    base_ids = load_cached_generations(rundir.cache_dir, cache_key) if cfg.eval.cache_base_generations else None
    if base_ids is None:
        base_ids = generate_greedy(model, prompts, desc="eval: base", **gen)
        if cfg.eval.cache_base_generations:
            save_cached_generations(rundir.cache_dir, cache_key, base_ids)
    else:
        print(f"eval: base generations reused from the cache ({len(base_ids)} prompts)")
    base_loss = heldout_loss(model, loss_examples, device) if loss_examples else float("nan")

    model = _load_adapter(model, rundir.adapter_dir)
    lora_loss = heldout_loss(model, loss_examples, device) if loss_examples else float("nan")
    model = model.merge_and_unload()
    lora_ids = generate_greedy(model, prompts, desc="eval: LoRA", **gen)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    base_text, lora_text = [decode(x) for x in base_ids], [decode(x) for x in lora_ids]
    n = len(records)
    base_scores = score_corpus(base_text[:n], references) if n else dict.fromkeys(METRICS, float("nan"))
    lora_scores = score_corpus(lora_text[:n], references) if n else dict.fromkeys(METRICS, float("nan"))
    base_scores.update(eval_loss=base_loss, perplexity=math.exp(base_loss))
    lora_scores.update(eval_loss=lora_loss, perplexity=math.exp(lora_loss))

    predictions = [
        {
            "prompt": tokenizer.decode(prompts[i], skip_special_tokens=False),
            "instruction": records[i].get("instruction", ""),
            "input": records[i].get("input", ""),
            "reference": references[i],
            "base": base_text[i],
            "lora": lora_text[i],
            "scores": {"base": example_scores(base_text[i], references[i]), "lora": example_scores(lora_text[i], references[i])},
        }
        for i in range(n)
    ]
    with rundir.attempt("eval", expected):  # the outputs change together, or the manifest says they did not
        write_jsonl(rundir.predictions_file, predictions)
        atomic_write_text(rundir.examples_file, examples_markdown(cfg.eval.prompts, base_text[n:], lora_text[n:]))
        atomic_write_text(rundir.eval_results_file, eval_results_csv(base_scores, lora_scores))
        rundir.mark_done("eval", expected, time.perf_counter() - start, inputs=inputs, prompts=n)
    print(
        f"eval: {n} held-out prompts; ROUGE-L base {base_scores['rougeL']:.4f} -> LoRA {lora_scores['rougeL']:.4f}, "
        f"BLEU {base_scores['bleu']:.4f} -> {lora_scores['bleu']:.4f}, held-out loss {base_loss:.3f} -> {lora_loss:.3f} "
        f"-> {rundir.eval_results_file}"
    )
