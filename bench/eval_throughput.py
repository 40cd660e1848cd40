"""Evaluation generation speed: loralab's batched greedy decoding vs the usual per-example loop.

Runs offline on a TinyLlama-1.1B-shaped model with random weights and a LoRA adapter whose B matrices
are perturbed (they start at zero, which would make the adapter a no-op):

* loralab: the adapter merged into the base weights, then `generate_greedy` (length-sorted batches,
  left padding, KV cache, per-sequence EOS).
* baseline: the notebook way, `model.generate(do_sample=False)` one prompt at a time on the unmerged
  PeftModel.

Both decode the same Alpaca prompts (TinyLlama chat template, user turn) to the same max_new_tokens;
the script prints generated tokens per second, the speed-up and the share of prompts whose greedy outputs
agree. By default the per-example loop is timed on the first 16 prompts only (the output says so): its
tokens/s hardly depends on how many prompts it runs, and all 64 take ~20 minutes on 2 CPU cores.

A second part repeats the comparison in fp32 on a narrower model of the same structure (32 prompts, the
baseline on all of them), where merged and unmerged LoRA agree to rounding error and outputs should match.
In bf16 they need not: the merged weights are rounded to bf16, so the two sides drift apart after the
first near-tie between two tokens.

    python bench/eval_throughput.py                         # 64 prompts, 64 new tokens, bf16
    python bench/eval_throughput.py --baseline-prompts 64   # time the baseline on every prompt (slow)
    python bench/eval_throughput.py --fp32-prompts 0        # skip the fp32 check
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from loralab.data import make_template, prompt_ids, user_message, validate_record
from loralab.generation import available_memory_bytes, choose_batch_size, cut_at_eos, generate_greedy
from loralab.tiny import TINYLLAMA_CONFIG, train_tokenizer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_en_1k.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
# TinyLlama's structure (grouped-query attention 4:1, head_dim 64, SwiGLU, untied head, 32k vocab) at
# ~1/20 of the parameters, so the fp32 per-example loop stays short.
SMALL_CONFIG = TINYLLAMA_CONFIG | dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                       num_attention_heads=8, num_key_value_heads=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="number of Alpaca prompts to decode")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the TinyLlama-shaped run")
    parser.add_argument(
        "--baseline-prompts",
        type=int,
        default=16,
        help="time the per-example loop on the first N prompts only",
    )
    parser.add_argument("--fp32-prompts", type=int, default=32, help="prompts in the fp32 check (0 skips it)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Alpaca-format JSON records")
    return parser.parse_args(argv)


def load_prompts(data: Path, n: int):
    """(tokenizer, n prompt id lists) from the Alpaca records, tokenizer trained on all of them."""
    records = [validate_record(r, f"{data}[{i}]") for i, r in enumerate(json.loads(data.read_text()))]
    tokenizer = train_tokenizer([user_message(r) + "\n" + r["output"] for r in records], vocab_size=32000)
    template = make_template(tokenizer, "chat")
    return tokenizer, [prompt_ids(tokenizer, template, record) for record in records[:n]]


def lora_model(config: dict, dtype: torch.dtype, seed: int = 0):
    """A random model of ``config`` wrapped in a LoRA adapter with perturbed B matrices, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    peft_model = get_peft_model(model, LoraConfig(**LORA))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    return peft_model.eval()


def notebook_generate(peft_model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int) -> list[list[int]]:
    """The per-example loop found in most fine-tuning notebooks: one ``generate`` call per prompt."""
    outputs = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt])
        with torch.no_grad():
            sequence = peft_model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_token_id,
                pad_token_id=eos_token_id,
            )
        outputs.append(cut_at_eos(sequence[0, len(prompt) :].tolist(), {eos_token_id}))
    return outputs


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(ours, theirs))
    prefix = sum(shared_prefix(a, b) for a, b in zip(ours, theirs)) / len(theirs)
    return f"{same}/{len(theirs)} = {same / len(theirs):.0%} (mean shared prefix {prefix:.1f} tokens)"


def compare(config: dict, dtype: torch.dtype, prompts, max_new_tokens: int, eos: int, baseline_n: int, label: str):
    """Time both sides on one model; print tokens/s, speed-up and output agreement."""
    peft_model = lora_model(config, dtype)
    merged = copy.deepcopy(peft_model)
    started = time.perf_counter()
    merged = merged.merge_and_unload().eval()
    merge_s = time.perf_counter() - started

    # One tiny call per side first, so one-off kernel set-up is timed on neither.
    generate_greedy(merged, prompts[:2], max_new_tokens=2, eos_token_ids=[eos], pad_token_id=eos, progress=False)
    notebook_generate(peft_model, prompts[:1], 2, eos)

    batch = choose_batch_size(merged.config, max(map(len, prompts)) + max_new_tokens, dtype, available_memory_bytes("cpu"))
    load = [os.getloadavg()[0]]
    started = time.perf_counter()
    ours = generate_greedy(merged, prompts, max_new_tokens=max_new_tokens, eos_token_ids=[eos], pad_token_id=eos, desc="loralab")
    ours_s = time.perf_counter() - started + merge_s
    ours_tokens = sum(map(len, ours))
    load.append(os.getloadavg()[0])

    subset = prompts[:baseline_n]
    started = time.perf_counter()
    theirs = notebook_generate(peft_model, subset, max_new_tokens, eos)
    theirs_s = time.perf_counter() - started
    theirs_tokens = sum(map(len, theirs))
    load.append(os.getloadavg()[0])

    ours_rate, theirs_rate = ours_tokens / ours_s, theirs_tokens / theirs_s
    subset_note = "" if len(subset) == len(prompts) else f", timed on the first {len(subset)} of {len(prompts)} prompts"
    print(f"\n== {label}")
    print(f"   {len(prompts)} prompts ({min(map(len, prompts))}..{max(map(len, prompts))} tokens), "
          f"max_new_tokens={max_new_tokens}, torch threads={torch.get_num_threads()}, auto batch size={batch}")
    print(f"   loralab generate_greedy, LoRA merged, batched : {ours_tokens:6d} tokens in {ours_s:7.1f} s "
          f"= {ours_rate:7.2f} tokens/s (incl. {merge_s:.1f} s merge)")
    print(f"   per-example model.generate, unmerged PeftModel: {theirs_tokens:6d} tokens in {theirs_s:7.1f} s "
          f"= {theirs_rate:7.2f} tokens/s{subset_note}")
    print(f"   speed-up: {ours_rate / theirs_rate:.1f}x   (1-min load average before/between/after: "
          f"{' / '.join(f'{x:.1f}' for x in load)} on {os.cpu_count()} CPUs, this run alone ~2; other jobs slow the two sides unevenly)")
    print(f"   identical greedy outputs: {agreement(ours[: len(subset)], theirs)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.data.exists():
        sys.exit(f"no Alpaca data at {args.data}; pass --data")
    tokenizer, prompts = load_prompts(args.data, max(args.prompts, args.fp32_prompts))
    eos = tokenizer.eos_token_id
    compare(TINYLLAMA_CONFIG, DTYPES[args.dtype], prompts[: args.prompts], args.max_new_tokens, eos, args.baseline_prompts,
            f"TinyLlama-1.1B shape, random weights, {args.dtype}, LoRA r=8 alpha=16 on q/k/v/o")
    if args.fp32_prompts:
        fp32_prompts = prompts[: args.fp32_prompts]
        compare(SMALL_CONFIG, torch.float32, fp32_prompts, args.max_new_tokens, eos, len(fp32_prompts),
                "fp32 identical-output check: TinyLlama structure at hidden 512 x 8 layers (~55M params)")


if __name__ == "__main__":
    main()
