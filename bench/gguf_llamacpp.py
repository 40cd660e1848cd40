"""The exported GGUF in a real client: llama.cpp (llama-cpp-python) against transformers on SmolLM2-135M-Instruct.

Trains a LoRA adapter for a few steps on the shared Alpaca records, exports it with `loralab export-gguf`
(f16 and q8_0), the base model too (f16), and, as the baseline of the q8_0 choice, a q8_0 file with every
matrix in q8_0 (the embedding/output head too). Then for each chat prompt compares greedy continuations:

* prompt ids: llama.cpp's own tokenisation of the rendered chat prompt (with the file's add_bos_token)
  against loralab's (`conversation_prompt_ids`);
* f16 GGUF vs the merged transformers model: equal for the first 32 tokens, and both stop at the EOS;
* q8_0 GGUF (and the all-q8_0 baseline) vs the merged transformers model: the same, counted, with the
  first position where they part and transformers' top-2 logit margin there (a near-tie or not);
* the fine-tune survives: the LoRA GGUF's answer differs from the base GGUF's wherever transformers'
  LoRA answer differs from the base model's.

Then generation speed on the same prompts, greedy, the same number of new tokens and threads on each side:
llama.cpp (f16 and q8_0) beside transformers (merged model, fp32 and bf16), medians of a few repeats.
Prints tables; `main()` returns the rows for tests.

    flock /tmp/loralab-heavy.lock python bench/gguf_llamacpp.py --model models/smollm2-135m-instruct
    # the model: `loralab fetch smollm2-135m-instruct`
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

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
SPEED_REPEATS = 3


def cpu_name() -> str:
    """lscpu's model name, with the core count and whether the CPU has native bf16 (avx512_bf16/amx_bf16)."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    except (OSError, subprocess.CalledProcessError):
        info = {}
    flags = info.get("Flags", "").split()
    bf16 = "native bf16 (avx512_bf16)" if "avx512_bf16" in flags or "amx_bf16" in flags else "no native bf16"
    family = info.get("CPU family", "?")  # AMD family 26 (0x1a) is Zen 5
    return (f"{info.get('Model name', 'unknown CPU')} (family {family}{', Zen 5' if family == '26' else ''}), "
            f"{info.get('CPU(s)', os.cpu_count())} cores, {bf16}")


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


def export_all(run: Path, model: str, work: Path) -> dict[str, Path]:
    """The GGUF files compared: the run's f16 and q8_0, the all-q8_0 baseline and the base model's f16."""
    from loralab import cli
    from loralab.commands import export_gguf
    # The baseline first: export-gguf records its folder in the run's manifest, and the real export after it wins.
    with mock.patch.object(export_gguf, "Q8_0_KEPT_F16", ()):
        ok = cli.main(["export-gguf", str(run), "--quant", "q8_0", "--out", str(work / "q8-all"), "--overwrite"]) == 0
    for argv in (["export-gguf", str(run), "--overwrite"],
                 ["export-gguf", model, "--out", str(work / "base-gguf"), "--quant", "f16", "--overwrite"]):
        ok = ok and cli.main(argv) == 0
    if not ok:
        sys.exit("export-gguf failed")
    return {"f16": run / "gguf/model-f16.gguf", "q8_0": run / "gguf/model-q8_0.gguf",
            "q8_0 all": work / "q8-all/model-q8_0.gguf", "base": work / "base-gguf/model-f16.gguf"}


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


def hf_greedy(model, ids: list[int], n: int, eos: int) -> tuple[list[int], bool, list[torch.Tensor]]:
    """(new tokens, stopped at the EOS, the logits of every step) of transformers' greedy decoding."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                             repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=50,
                             output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, len(ids):].tolist()
    logits = [step[0].float() for step in out.logits]  # one (vocab,) row per new token
    return (new[: new.index(eos)], True, logits) if eos in new else (new, False, logits)


def first_divergence(ref: list[int], ref_stop: bool, got: list[int], got_stop: bool, n: int) -> int | None:
    """The first of the first ``n`` positions where two greedy answers differ (a stop counts as a token), or None."""
    ref_, got_ = ref + [-1] * ref_stop, got + [-1] * got_stop
    for i in range(min(n, max(len(ref_), len(got_)))):
        if i >= len(ref_) or i >= len(got_) or ref_[i] != got_[i]:
            return i
    return None


def top2_margin(logits: list[torch.Tensor], position: int | None) -> float | None:
    """Transformers' logit gap between its first and second choice at ``position`` (small: a near-tie)."""
    if position is None or position >= len(logits):
        return None
    top = torch.topk(logits[position], 2).values
    return float(top[0] - top[1])


def compare_prompt(prompt: str, tok, template, merged, base, cpp: dict) -> dict:
    """One prompt through transformers (merged, base) and every GGUF: the agreement row."""
    from loralab.data import conversation_prompt_ids, conversation_prompt_text

    messages = [{"role": "user", "content": prompt}]
    ids = conversation_prompt_ids(tok, template, messages)
    text = conversation_prompt_text(template, messages)
    add_bos = cpp["f16"].metadata.get("tokenizer.ggml.add_bos_token") == "true"
    eos, n = tok.eos_token_id, COMPARED_TOKENS
    hf, hf_stop, logits = hf_greedy(merged, ids, MAX_NEW_TOKENS, eos)
    hf_base, _, _ = hf_greedy(base, ids, MAX_NEW_TOKENS, eos)
    row = {"prompt": prompt, "ids_equal": cpp["f16"].tokenize(text.encode(), add_bos=add_bos, special=True) == ids,
           "lora_differs_hf": hf != hf_base, "answer": tok.decode(hf, skip_special_tokens=True),
           "base_answer": tok.decode(hf_base, skip_special_tokens=True)}
    answers = {name: llama_greedy(cpp[name], ids, MAX_NEW_TOKENS)[:2] for name in ("f16", "q8_0", "q8_0 all", "base")}
    for name in ("f16", "q8_0", "q8_0 all"):
        got, stop = answers[name]
        where = first_divergence(hf, hf_stop, got, stop, n)
        row[name] = {"equal": where is None, "diverges_at": where, "margin": top2_margin(logits, where),
                     "stops": stop == hf_stop and (got == hf if hf_stop else True)}
    row["lora_differs_gguf"] = answers["f16"][0] != answers["base"][0]
    return row


def print_agreement(rows: list[dict], steps: int) -> None:
    print(f"\nSmolLM2-135M-Instruct + LoRA ({steps} steps), greedy; first {COMPARED_TOKENS} tokens compared with the "
          "merged transformers model (fp32). Where a file parts from it: the position, and transformers' top-2 "
          "logit margin there.\n")
    print("| prompt | prompt ids = llama.cpp's | f16 | f16 stops where transformers does | q8_0 (f16 embedding/head) "
          "| q8_0, all matrices (baseline) | LoRA != base (transformers) | LoRA != base (GGUF) |")
    print("|---|---|---|---|---|---|---|---|")
    yes = lambda b: "yes" if b else "NO"

    def agree(cell: dict) -> str:
        return "= 32/32" if cell["equal"] else f"parts at {cell['diverges_at']} (margin {cell['margin']:.3f})"

    for r in rows:
        print(f"| {r['prompt']} | {yes(r['ids_equal'])} | {agree(r['f16'])} | {yes(r['f16']['stops'])} | "
              f"{agree(r['q8_0'])} | {agree(r['q8_0 all'])} | {yes(r['lora_differs_hf'])} | "
              f"{yes(r['lora_differs_gguf'])} |")
    counts = {name: sum(r[name]["equal"] for r in rows) for name in ("f16", "q8_0", "q8_0 all")}
    print(f"\nagree on the first {COMPARED_TOKENS} tokens: f16 {counts['f16']}/{len(rows)}, "
          f"q8_0 {counts['q8_0']}/{len(rows)}, q8_0 all matrices {counts['q8_0 all']}/{len(rows)}")
    for r in rows:
        print(f"- {r['prompt']}\n    LoRA: {r['answer']!r}\n    base: {r['base_answer']!r}")


def main(argv: list[str] | None = None) -> dict:
    import llama_cpp
    from transformers import AutoModelForCausalLM

    from loralab.data import make_template
    from loralab.models.adapters import load_merged, resolve_target

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/alpaca_en_1k.json"))
    parser.add_argument("--work", default="outputs/gguf-proof")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both llama.cpp and torch")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed table")
    args = parser.parse_args(argv)
    work = Path(args.work)
    torch.set_num_threads(args.threads)

    run = train_run(Path(args.model), work, Path(args.data), args.steps)
    files = export_all(run, args.model, work)
    merged, tok = load_merged(resolve_target(str(run)), "the proof")
    base = AutoModelForCausalLM.from_pretrained(args.model)
    template = make_template(tok)
    cpp = {name: llama_cpp.Llama(str(path), n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads,
                                 verbose=False) for name, path in files.items()}
    rows = [compare_prompt(prompt, tok, template, merged, base, cpp) for prompt in PROMPTS]
    print_agreement(rows, args.steps)

    sizes = {"model-f16.gguf": files["f16"].stat().st_size, "model-q8_0.gguf (f16 embedding/head)":
             files["q8_0"].stat().st_size, "all-q8_0 baseline": files["q8_0 all"].stat().st_size}
    sizes["base model.safetensors (fp32, from the Q4_1 GGUF)"] = (Path(args.model) / "model.safetensors").stat().st_size
    print("\n| file | size |\n|---|---|")
    for name, size in sizes.items():
        print(f"| {name} | {size / 1e6:.1f} MB |")
    result = {"rows": rows, "sizes": sizes}
    if not args.no_speed:
        result["speed"] = speed_table(cpp, merged, tok, template, args.threads)
    print(f"\nCPU: {cpu_name()}; {args.threads} threads; torch {torch.__version__}, "
          f"llama-cpp-python {llama_cpp.__version__}")
    return result


def speed_table(cpp: dict, merged, tok, template, threads: int) -> dict:
    """Tokens/s over the PROMPTS, SPEED_TOKENS new tokens each (EOS ignored: fixed length), prompt processing
    included; the engines take turns in each repeat so that the machine's noise falls on all of them."""
    from loralab.data import conversation_prompt_ids

    prompts = [conversation_prompt_ids(tok, template, [{"role": "user", "content": p}]) for p in PROMPTS]

    def cpp_run(llm, ids: list[int]) -> None:
        for n, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True), start=1):
            if n == SPEED_TOKENS:
                return

    def hf_run(model, ids: list[int]) -> None:
        with torch.inference_mode():
            model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=SPEED_TOKENS, min_new_tokens=SPEED_TOKENS, do_sample=False,
                           pad_token_id=tok.eos_token_id)

    load_before = os.getloadavg()[0]
    bf16 = copy.deepcopy(merged).to(torch.bfloat16)
    engines = {"llama.cpp f16 GGUF": lambda ids: cpp_run(cpp["f16"], ids),
               "llama.cpp q8_0 GGUF": lambda ids: cpp_run(cpp["q8_0"], ids),
               "transformers fp32 (merged)": lambda ids: hf_run(merged, ids),
               "transformers bf16 (merged)": lambda ids: hf_run(bf16, ids)}
    for fn in engines.values():
        fn(prompts[0])  # warm-up: first-call allocations and oneDNN kernel choice
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(SPEED_REPEATS):
        for name, fn in engines.items():
            start = time.perf_counter()
            for ids in prompts:
                fn(ids)
            rates[name].append(SPEED_TOKENS * len(prompts) / (time.perf_counter() - start))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    ref = medians["transformers fp32 (merged)"]
    print(f"\nGeneration speed: the {len(prompts)} prompts above ({min(map(len, prompts))}-{max(map(len, prompts))} "
          f"prompt tokens), greedy, {SPEED_TOKENS} new tokens each, batch 1, {threads} threads on each side, "
          f"prompt processing included; median of {SPEED_REPEATS} repeats (each repeat: all prompts, engines in "
          f"turn); 1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"({os.cpu_count()} cores)"
          "\n\n| engine | tokens/s (median) | repeats | vs transformers fp32 |\n|---|---|---|---|")
    for name, rate in medians.items():
        runs = ", ".join(f"{r:.1f}" for r in rates[name])
        print(f"| {name} | {rate:.1f} | {runs} | {rate / ref:.2f}x |")
    return medians


if __name__ == "__main__":
    main()
