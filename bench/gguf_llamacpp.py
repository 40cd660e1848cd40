"""The exported GGUF in a real client: llama.cpp (llama-cpp-python) against transformers on SmolLM2-135M-Instruct.

Trains a LoRA adapter for a few steps on the shared Alpaca records, exports it with `loralab export-gguf`
(f16 and q8_0) and the base model too (f16), then for each chat prompt compares greedy continuations:

* prompt ids: llama.cpp's own tokenisation of the rendered chat prompt (with the file's add_bos_token)
  against loralab's (`conversation_prompt_ids`);
* f16 GGUF vs the merged transformers model: equal for the first 32 tokens, and both stop at the EOS;
* q8_0 GGUF vs the merged transformers model: the same, counted;
* the fine-tune survives: the LoRA GGUF's answer differs from the base GGUF's wherever transformers'
  LoRA answer differs from the base model's.

Then decoding speed, one prompt, greedy, on this CPU: llama.cpp (f16 and q8_0) beside transformers
(merged model, fp32 and bf16). Prints tables; `main()` returns the rows for tests.

    python bench/gguf_llamacpp.py --model models/smollm2-135m-instruct     # `loralab fetch smollm2-135m-instruct`
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Translate 'Good morning' into Spanish.",
    "What is 7 times 8?",
    "Give me a synonym for 'happy'.",
]
COMPARED_TOKENS = 32
MAX_NEW_TOKENS = 96
SPEED_TOKENS = 64


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train_run(model_dir: Path, work: Path, data: Path, steps: int) -> Path:
    """A LoRA run of ``steps`` optimizer steps (prepare, train, eval) on ``model_dir``; returns the run dir."""
    from loralab import cli

    cfg = {
        "name": "proof", "output_dir": str(work / "runs"),
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data), "num_examples": 96, "eval_size": 8, "max_length": 256},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "train": {"max_steps": steps, "learning_rate": 1e-3, "warmup_steps": 1, "gradient_accumulation_steps": 4,
                  "logging_steps": 1, "save_steps": 1000, "precision": "fp32", "device": "cpu"},
        "eval": {"max_new_tokens": 32, "num_examples": 4, "prompts": PROMPTS[:1]},
    }
    path = work / "proof.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    for stage in ("prepare", "train", "eval"):
        if cli.main([stage, str(path)]) != 0:
            sys.exit(f"{stage} failed")
    return work / "runs" / "proof"


def llama_greedy(llm, ids: list[int], n: int) -> tuple[list[int], bool, float]:
    """(new tokens, stopped at an end-of-generation token, seconds) of llama.cpp's greedy decoding."""
    import llama_cpp

    out, stopped = [], False
    start = time.perf_counter()
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            stopped = True
            break
        out.append(token)
        if len(out) == n:
            break
    return out, stopped, time.perf_counter() - start


def hf_greedy(model, ids: list[int], n: int, eos: int) -> tuple[list[int], bool, float]:
    start = time.perf_counter()
    with torch.inference_mode():
        seq = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                             repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=50)
    new = seq[0, len(ids):].tolist()
    seconds = time.perf_counter() - start
    return (new[: new.index(eos)], True, seconds) if eos in new else (new, False, seconds)


def speed(fn, ids: list[int], repeats: int = 3) -> float:
    """Median decode tokens/s over ``repeats`` runs of SPEED_TOKENS new tokens (EOS ignored: fixed length)."""
    rates = []
    for _ in range(repeats):
        tokens, seconds = fn(ids)
        rates.append(tokens / seconds)
    return sorted(rates)[len(rates) // 2]


def main(argv: list[str] | None = None) -> dict:
    import llama_cpp
    from transformers import AutoModelForCausalLM

    from loralab import cli
    from loralab.adapters import load_merged, resolve_target
    from loralab.data import (
        conversation_prompt_ids,
        conversation_prompt_text,
        make_template,
    )
    from loralab.modeling import cpu_has_native_bf16

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/alpaca_en_1k.json"))
    parser.add_argument("--work", default="outputs/gguf-proof")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-speed", action="store_true", help="skip the speed table")
    args = parser.parse_args(argv)
    work = Path(args.work)

    run = train_run(Path(args.model), work, Path(args.data), args.steps)
    for argv_ in (["export-gguf", str(run), "--overwrite"],
                  ["export-gguf", args.model, "--out", str(work / "base-gguf"), "--quant", "f16", "--overwrite"]):
        if cli.main(argv_) != 0:
            sys.exit("export-gguf failed")
    merged, tok = load_merged(resolve_target(str(run)), "the proof")
    base = AutoModelForCausalLM.from_pretrained(args.model)
    template = make_template(tok)
    eos = tok.eos_token_id
    load = lambda p: llama_cpp.Llama(str(p), n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    cpp = {"f16": load(run / "gguf/model-f16.gguf"), "q8_0": load(run / "gguf/model-q8_0.gguf"),
           "base": load(work / "base-gguf/model-f16.gguf")}

    rows = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = conversation_prompt_ids(tok, template, messages)
        text = conversation_prompt_text(template, messages)
        add_bos = cpp["f16"].metadata.get("tokenizer.ggml.add_bos_token") == "true"
        cpp_ids = cpp["f16"].tokenize(text.encode(), add_bos=add_bos, special=True)
        hf, hf_stop, _ = hf_greedy(merged, ids, MAX_NEW_TOKENS, eos)
        hf_base, _, _ = hf_greedy(base, ids, MAX_NEW_TOKENS, eos)
        f16, f16_stop, _ = llama_greedy(cpp["f16"], ids, MAX_NEW_TOKENS)
        q8, q8_stop, _ = llama_greedy(cpp["q8_0"], ids, MAX_NEW_TOKENS)
        cpp_base, _, _ = llama_greedy(cpp["base"], ids, MAX_NEW_TOKENS)
        n = COMPARED_TOKENS
        rows.append({
            "prompt": prompt, "ids_equal": cpp_ids == ids,
            "f16_equal": f16[:n] == hf[:n],
            "f16_stops": f16_stop == hf_stop and (f16 == hf if hf_stop else True),
            "q8_equal": q8[:n] == hf[:n], "q8_stops": q8_stop,
            "lora_differs_hf": hf != hf_base, "lora_differs_gguf": f16 != cpp_base,
            "answer": tok.decode(hf, skip_special_tokens=True),
            "base_answer": tok.decode(hf_base, skip_special_tokens=True),
        })

    print(f"\nSmolLM2-135M-Instruct + LoRA ({args.steps} steps), greedy; first {COMPARED_TOKENS} tokens compared\n")
    print("| prompt | prompt ids (llama.cpp tokeniser) | f16 = transformers | f16 stops where transformers does "
          "| q8_0 = transformers | LoRA != base (transformers) | LoRA != base (GGUF) |")
    print("|---|---|---|---|---|---|---|")
    yes = lambda b: "yes" if b else "NO"
    for r in rows:
        print(f"| {r['prompt']} | {yes(r['ids_equal'])} | {yes(r['f16_equal'])} | {yes(r['f16_stops'])} | "
              f"{yes(r['q8_equal'])} | {yes(r['lora_differs_hf'])} | {yes(r['lora_differs_gguf'])} |")
    f16_ok, q8_ok = sum(r["f16_equal"] for r in rows), sum(r["q8_equal"] for r in rows)
    print(f"\nf16 agrees on {f16_ok}/{len(rows)}, q8_0 on {q8_ok}/{len(rows)}")
    for r in rows:
        print(f"- {r['prompt']}\n    LoRA: {r['answer']!r}\n    base: {r['base_answer']!r}")
    sizes = {name: (run / "gguf" / name).stat().st_size for name in ("model-f16.gguf", "model-q8_0.gguf")}
    sizes["base model.safetensors (fp32, from the Q4_1 GGUF)"] = (Path(args.model) / "model.safetensors").stat().st_size
    print("\n| file | size |\n|---|---|")
    for name, size in sizes.items():
        print(f"| {name} | {size / 1e6:.1f} MB |")
    result = {"rows": rows, "sizes": sizes}
    if not args.no_speed:
        result["speed"] = speed_table(cpp, merged, tok, template)
    print(f"\nCPU: {cpu_name()} ({os.cpu_count()} cores visible, native bf16: {cpu_has_native_bf16()}); "
          f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}")
    return result


def speed_table(cpp: dict, merged, tok, template) -> dict:
    """Decode tokens/s for one prompt, SPEED_TOKENS new tokens, median of 3: llama.cpp beside transformers."""
    import copy

    from loralab.data import conversation_prompt_ids

    ids = conversation_prompt_ids(tok, template, [{"role": "user", "content": "Write a long story about a dragon."}])

    def cpp_fn(llm):
        def run(ids_):
            llm.reset()
            start, n = time.perf_counter(), 0
            for _ in llm.generate(ids_, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                n += 1
                if n == SPEED_TOKENS:
                    break
            return n, time.perf_counter() - start
        return run

    def hf_fn(model):
        def run(ids_):
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(torch.tensor([ids_]), max_new_tokens=SPEED_TOKENS, min_new_tokens=SPEED_TOKENS,
                               do_sample=False, pad_token_id=tok.eos_token_id)
            return SPEED_TOKENS, time.perf_counter() - start
        return run

    rates = {"llama.cpp f16": speed(cpp_fn(cpp["f16"]), ids), "llama.cpp q8_0": speed(cpp_fn(cpp["q8_0"]), ids),
             "transformers fp32 (merged)": speed(hf_fn(merged), ids),
             "transformers bf16 (merged)": speed(hf_fn(copy.deepcopy(merged).to(torch.bfloat16)), ids)}
    ref = rates["transformers fp32 (merged)"]
    print(f"\nDecode speed, one prompt ({len(ids)} tokens), {SPEED_TOKENS} new tokens, median of 3 "
          f"(prompt processing included)\n\n| engine | tokens/s | vs transformers fp32 |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / ref:.2f}x |")
    return rates


if __name__ == "__main__":
    main()
