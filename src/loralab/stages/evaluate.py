"""The eval stage: greedy answers from the base model and from base + adapter, scored against references.

The base model is loaded once: it answers and its held-out loss is measured (or both are reused from the
cache), then the adapter is loaded onto it and merged into the weights, so the LoRA model's held-out loss
and answers cost no extra matmul per token.
"""

from __future__ import annotations

import csv
import io
import math
import time

import torch

from loralab.config import ExperimentConfig
from loralab.cpu.speed_path import inference_path
from loralab.data import make_template, prompt_ids, reference_answer
from loralab.devices import detect_device, probe
from loralab.errors import LoralabError, first_sentence, hide_library_deprecations
from loralab.files import atomic_write_text, read_jsonl, write_jsonl
from loralab.generation import cache_key, generate_greedy, load_cached, save_cached
from loralab.intervals import Change, loss_changes, metric_changes
from loralab.loss import HELDOUT_ROW_TOKENS, heldout_example_losses, mean_loss
from loralab.metrics import example_scores, score_corpus
from loralab.models.loading import load_model, load_tokenizer
from loralab.precision import choose_precision
from loralab.runs.fingerprints import model_fingerprint, stage_keys
from loralab.runs.layout import RunDir
from loralab.runs.protocol import Stage
from loralab.runs.readers import CHANGE_COLUMNS

METRICS = ("bleu", "rouge1", "rouge2", "rougeL")


def eval_results_csv(base: dict[str, float], lora: dict[str, float], changes: dict[str, Change] | None = None) -> str:
    """eval_results.csv: metric, base, lora (as ever), then each metric's change with its 95% interval and the
    shares of prompts where LoRA is better, worse or tied (blank where there is no per-prompt score)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["metric", "base", "lora", *CHANGE_COLUMNS])
    for name in base:
        c = (changes or {}).get(name)
        extra = ([f"{c.delta:.6f}", f"{c.low:.6f}", f"{c.high:.6f}", f"{c.better:.4f}", f"{c.worse:.4f}",
                  f"{c.tied:.4f}"] if c else [f"{lora[name] - base[name]:.6f}", "", "", "", "", ""])
        writer.writerow([name, f"{base[name]:.6f}", f"{lora[name]:.6f}", *extra])
    return out.getvalue()


def examples_markdown(prompts: list[str], base: list[str], lora: list[str]) -> str:
    parts = ["# Before and after\n", "Greedy answers to fixed prompts, from the base model and from base + LoRA.\n"]
    for i, (prompt, b, l) in enumerate(zip(prompts, base, lora, strict=False), 1):
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


def _cached(cache_dir, key: str, compute, what: str):
    """The value cached under ``key`` in ``cache_dir`` (None: no cache), else ``compute()``, then cached."""
    value = load_cached(cache_dir, key) if cache_dir is not None else None
    if value is not None:
        print(f"eval: {what} reused from the cache")
        return value
    value = compute()
    if cache_dir is not None:
        save_cached(cache_dir, key, value)
    return value


ExampleLosses = list[tuple[float, int]]  # per held-out example: (summed response loss, trained tokens)


def _losses_from_training(rundir: RunDir, precision: str, device: str) -> tuple[ExampleLosses | None, ...]:
    """The (base, LoRA) held-out losses per example that `loralab train` logged over the whole eval split, where it
    did: the step-0 row (LoRA's B is still zero, so that is the base model) and the row at its last step. None for
    each it did not log (runs trained before it logged them per example), or when it trained on another device or
    in another precision."""
    manifest = rundir.manifest()
    steps = manifest.get("stages", {}).get("train", {}).get("steps")
    if steps is None or manifest.get("precision") != precision or manifest.get("device") != device:
        return None, None
    rows = {r["step"]: r["eval_example_losses"] for r in read_jsonl(rundir.metrics_file)
            if "eval_example_losses" in r and "step" in r}
    found = [rows.get(0), rows.get(steps)]
    return tuple([(float(s), int(c)) for s, c in pairs] if pairs is not None else None for pairs in found)


def _heldout_losses(model, examples: list[dict], device: str, desc: str,
                    measured: ExampleLosses | None = None) -> ExampleLosses:
    """Each example's response loss sum and token count, with a progress bar; ``measured`` when training already
    measured them on these examples (said so, not recomputed).

    On the CPU speed path's inference pieces (cpu.speed_path.inference_path): packed rows attended one example at a
    time, as in training, and the linear weights prepacked for oneDNN for the pass (put back bit for bit after).
    """
    if not examples:
        return []
    if measured is not None and len(measured) == len(examples):
        print(f"{desc}: {mean_loss(measured):.4f}, as loralab train measured it (metrics.jsonl)")
        return measured
    with inference_path(model, rows_hint=HELDOUT_ROW_TOKENS):
        return heldout_example_losses(model, examples, device, progress=True, desc=desc)


def _answers_and_losses(cfg, rundir, prompts, loss_examples, trained, gen, precision, device):
    """(base answers, LoRA answers, base losses, LoRA losses; the losses per example): the base model loaded once,
    then merged with the adapter.

    The base model's answers and losses come from the cache when they are there (eval.cache_base_generations);
    ``trained`` holds the (base, LoRA) losses loralab train already measured on these examples, or Nones.
    """
    model = load_model(cfg.model, precision, device)
    settings = {"max_new_tokens": cfg.eval.max_new_tokens, "precision": precision, "device": device,
                "eos": gen["eos_token_ids"], "revision": cfg.model.revision}
    fingerprint = model_fingerprint(cfg.model.name_or_path)
    cache_dir = rundir.cache_dir if cfg.eval.cache_base_generations else None
    base_ids = _cached(cache_dir, cache_key(fingerprint, prompts, settings),
                       lambda: generate_greedy(model, prompts, desc="eval: base", **gen), "base generations")
    loss_settings = {"quantity": "heldout_example_losses", "precision": precision, "device": device,
                     "revision": cfg.model.revision}
    loss_inputs = [[e["input_ids"], e["labels"]] for e in loss_examples]
    base_losses = _cached(cache_dir, cache_key(fingerprint, loss_inputs, loss_settings),
                          lambda: _heldout_losses(model, loss_examples, device, "eval: base held-out loss",
                                                  trained[0]), "base held-out loss")
    base_losses = [(float(s), int(c)) for s, c in base_losses]  # the cache gives JSON lists

    # Merged first: the LoRA model's loss and answers then cost what the base model's did.
    model = _load_adapter(model, rundir.adapter_dir).merge_and_unload()
    lora_losses = _heldout_losses(model, loss_examples, device, "eval: LoRA held-out loss", trained[1])
    lora_ids = generate_greedy(model, prompts, desc="eval: LoRA", **gen)
    model = None  # freed before the cache is emptied
    if device == "cuda":
        torch.cuda.empty_cache()
    return base_ids, lora_ids, base_losses, lora_losses


@hide_library_deprecations
def run(cfg: ExperimentConfig, force: bool = False) -> str:
    rundir = RunDir(cfg)
    keys = stage_keys(cfg)
    stage = Stage(rundir, keys.eval, upstream=keys.train)
    stage.require_upstream()
    if stage.up_to_date(force):
        print(f"eval: up to date ({rundir.eval_results_file})")
        return stage.hash
    _evaluate(cfg, rundir, stage)
    return stage.hash


def _load_adapter(model, adapter_dir):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as err:  # noqa: BLE001 - PEFT raises RuntimeError (shapes), ValueError, KeyError, SafetensorError
        raise LoralabError(f"cannot load the adapter in {adapter_dir} onto the base model ({first_sentence(err)}); "
                           f"it was trained for another model or is damaged: run `loralab train CONFIG --force`"
                           ) from None


def _evaluate(cfg: ExperimentConfig, rundir: RunDir, stage: Stage) -> None:
    start = time.perf_counter()
    device = detect_device(cfg.train.device)
    precision = choose_precision(probe(device), cfg.train.precision)
    tokenizer = load_tokenizer(cfg.model)
    template = make_template(tokenizer, cfg.data.template, _data_format(rundir))
    held_out = read_jsonl(rundir.eval_file)
    if not held_out:
        raise LoralabError(f"the eval split in {rundir.eval_file} is empty (data.eval_size {cfg.data.eval_size}): "
                           f"nothing to score; set data.eval_size to 1 or more and run `loralab run CONFIG`")
    # loralab train measured both held-out losses over the whole eval split: reused when eval scores all of it.
    trained = _losses_from_training(rundir, precision, device)
    if cfg.eval.num_examples is not None and cfg.eval.num_examples < len(held_out):
        held_out, trained = held_out[: cfg.eval.num_examples], (None, None)
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
        batch_size=cfg.eval.batch_size,
    )

    base_ids, lora_ids, base_losses, lora_losses = _answers_and_losses(
        cfg, rundir, prompts, loss_examples, trained, gen, precision, device
    )

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    base_text, lora_text = [decode(x) for x in base_ids], [decode(x) for x in lora_ids]
    n = len(records)
    base_scores = score_corpus(base_text[:n], references) if n else dict.fromkeys(METRICS, float("nan"))
    lora_scores = score_corpus(lora_text[:n], references) if n else dict.fromkeys(METRICS, float("nan"))
    scores = {side: [example_scores(t, r) for t, r in zip(texts[:n], references, strict=True)]
              for side, texts in (("base", base_text), ("lora", lora_text))}
    changes = (metric_changes(base_text[:n], lora_text[:n], references, cfg.eval.bootstrap_resamples,
                              cfg.eval.bootstrap_seed, scores=scores) if n else {})
    if base_losses:
        changes.update(loss_changes(base_losses, lora_losses, cfg.eval.bootstrap_resamples, cfg.eval.bootstrap_seed))
    base_loss, lora_loss = (mean_loss(x) if x else float("nan") for x in (base_losses, lora_losses))
    base_scores.update(eval_loss=base_loss, perplexity=math.exp(base_loss))
    lora_scores.update(eval_loss=lora_loss, perplexity=math.exp(lora_loss))

    predictions = _predictions(tokenizer, prompts, records, references, base_text, lora_text, scores)
    with stage.attempt():  # the outputs change together, or the manifest says they did not
        write_jsonl(rundir.predictions_file, predictions)
        atomic_write_text(rundir.examples_file, examples_markdown(cfg.eval.prompts, base_text[n:], lora_text[n:]))
        atomic_write_text(rundir.eval_results_file, eval_results_csv(base_scores, lora_scores, changes))
        stage.done(time.perf_counter() - start, prompts=n,
                   answer_tokens=sum(map(len, base_ids)) + sum(map(len, lora_ids)))
    # the progress bars count the before/after prompts too: the line says so, so the two counts add up
    noun = "prompt" if len(fixed) == 1 else "prompts"
    fixed_note = f" (and {len(fixed)} before/after {noun}: {rundir.examples_file.name})" if fixed else ""
    print(
        f"eval: {n} held-out prompts{fixed_note}; "
        f"ROUGE-L base {base_scores['rougeL']:.4f} -> LoRA {lora_scores['rougeL']:.4f}, "
        f"BLEU {base_scores['bleu']:.4f} -> {lora_scores['bleu']:.4f}, "
        f"held-out loss {base_loss:.3f} -> {lora_loss:.3f} "
        f"-> {rundir.eval_results_file}"
    )


def _predictions(tokenizer, prompts: list[list[int]], records: list[dict], references: list[str],
                 base_text: list[str], lora_text: list[str], scores: dict[str, list[dict]]) -> list[dict]:
    """predictions.jsonl's rows: each held-out prompt, its reference, both answers and their scores."""
    return [
        {
            "prompt": tokenizer.decode(prompts[i], skip_special_tokens=False),
            "instruction": record.get("instruction", ""),
            "input": record.get("input", ""),
            "reference": references[i],
            "base": base_text[i],
            "lora": lora_text[i],
            "scores": {"base": scores["base"][i], "lora": scores["lora"][i]},
        }
        for i, record in enumerate(records)
    ]
