"""Does a quantised export keep the fine-tune? The run's fixed prompts answered greedily by the merged model, the
base model and each GGUF file in llama.cpp: where the adapter changed an answer, whether the file kept the change.

On SmolLM2-135M-Instruct a q8_0 file once gave the base model's answer on the one prompt the adapter had changed:
quantisation can quietly undo a fine-tune, and this check says so (`loralab export-gguf` runs it).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from loralab.data import conversation_prompt_ids
from loralab.errors import first_sentence
from loralab.generation import generate_greedy
from loralab.models.adapters import load_base

# The fine-tune check answers the run's fixed prompts with at most this many new tokens (eval.max_new_tokens when
# smaller): an adapter's change shows in the first tokens of an answer, and four models answer on a CPU.
CHECK_MAX_NEW_TOKENS = 64
VERDICTS = ("kept", "reverted", "other")
KEPT_RULE = ("a change is kept where the GGUF picks the merged model's token at the first token where the adapter "
             "changed the answer, reverted where it picks the base model's (the end of an answer counts as a token)")


def shared_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading items (tokens, or characters) ``a`` and ``b`` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def change_verdict(base: Sequence, merged: Sequence, quantised: Sequence) -> str | None:
    """Did the quantised answer keep the adapter's change? None where base == merged (no change to keep); else
    "kept", "reverted" or "other" by `KEPT_RULE`: at the first token where merged parts from base (the end of an
    answer counts as a token), quantised picks merged's token, base's, or another (or parted from both earlier).
    The same as: quantised shares a longer prefix with merged than with base (kept), a shorter one (reverted)."""
    if base == merged:
        return None
    at = shared_prefix(base, merged)
    if shared_prefix(quantised, merged) < at:
        return "other"

    def token(answer: Sequence):
        return answer[at] if at < len(answer) else None  # None: the answer ended here

    if token(quantised) == token(merged):
        return "kept"
    return "reverted" if token(quantised) == token(base) else "other"


def survival_summary(base: list[Sequence], merged: list[Sequence], quantised: list[Sequence]) -> dict:
    """Per-prompt verdicts (`change_verdict`) and their counts, with how many answers equal the merged model's."""
    verdicts = [change_verdict(b, m, q) for b, m, q in zip(base, merged, quantised, strict=True)]
    return {
        "prompts": len(verdicts),
        "same_as_merged": sum(m == q for m, q in zip(merged, quantised, strict=True)),
        "changed": sum(v is not None for v in verdicts),
        **{v: verdicts.count(v) for v in VERDICTS},
        "verdicts": verdicts,
    }


def _short(prompt: str, width: int = 40) -> str:
    text = " ".join(prompt.split())
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def survival_lines(quant: str, summary: dict, prompts: list[str]) -> list[str]:
    """The summary line of one GGUF's check, and a warning line when it reverted changes (which prompts)."""
    n, same = summary["prompts"], summary["same_as_merged"]
    if not summary["changed"]:
        return [f"export-gguf: {quant}: the adapter changed none of the {n} answers, so there is no change to keep; "
                f"same answer as the merged model on {same} of {n}"]
    lost = [f"{summary['reverted']} reverted to the base model's answer"] if summary["reverted"] else []
    lost += [f"{summary['other']} parted otherwise"] if summary["other"] else []
    lines = [f"export-gguf: {quant} keeps the fine-tune's change on {summary['kept']} of {summary['changed']} prompts "
             f"where the adapter changed the answer" + (f" ({', '.join(lost)})" if lost else "")
             + f"; same answer as the merged model on {same} of {n}"]
    reverted = [i for i, v in enumerate(summary["verdicts"]) if v == "reverted"]
    if reverted:
        which = ", ".join(f'{i + 1} "{_short(prompts[i])}"' for i in reverted)
        lines.append(f"export-gguf: warning: {quant} undoes the fine-tune on {len(reverted)} of {summary['changed']} "
                     f"changed prompts, answering as the base model: {which}")
    return lines


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_answers(path: Path, prompts: list[list[int]], max_new_tokens: int,
                 eos_token_ids: list[int]) -> list[list[int]]:
    """llama.cpp's greedy answers (temperature 0, no penalty) to token-id ``prompts``, cut before the first EOS,
    at most ``max_new_tokens`` long: what `generate_greedy` gives in transformers."""
    import llama_cpp

    n_ctx = max(256, max(len(p) for p in prompts) + max_new_tokens + 8)
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, verbose=False)
    answers = []
    try:
        for ids in prompts:
            out: list[int] = []
            for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
                if token in eos_token_ids:
                    break
                out.append(token)
                if len(out) >= max_new_tokens:
                    break
            answers.append(out)
    finally:
        llm.close()
    return answers


def check_fine_tune(tgt, merged_answers: list[list[int]], prompts: list[list[int]], max_new_tokens: int,
                    ggufs: dict[str, Path], eos_token_ids: list[int]) -> dict:
    """Each GGUF's llama.cpp answers against the merged model's (``merged_answers``) and the base model's
    (loaded here, fp32): a summary line per file, a warning where it reverts the adapter's changes; the record."""
    base, _ = load_base(tgt.model, torch.float32)
    base_answers = generate_greedy(base, prompts, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                                   progress=False)
    base = None  # freed before llama.cpp loads the files
    record = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "rule": KEPT_RULE, "quants": {}}
    for quant, path in ggufs.items():
        try:
            answers = gguf_answers(path, prompts, max_new_tokens, eos_token_ids)
        except (ValueError, RuntimeError, OSError) as err:  # llama-cpp-python: "Failed to load model from file"
            print(f"export-gguf: warning: llama.cpp could not run {path.name} ({first_sentence(err)}); it was not "
                  f"checked")
            record["quants"][quant] = {"error": first_sentence(err)}
            continue
        summary = survival_summary(base_answers, merged_answers, answers)
        for line in survival_lines(quant, summary, tgt.cfg.eval.prompts):
            print(line)
        record["quants"][quant] = summary
    return record


def survival_check(tgt, model, tokenizer, template, ggufs: dict[str, Path]) -> dict:
    """The fine-tune check of a run's exported ``ggufs`` (quant -> file) against its merged ``model`` (freed here):
    printed as it goes, returned as the manifest's record; skipped (said in one line) without eval.prompts or
    llama-cpp-python, never failing the export."""
    asked = tgt.cfg.eval.prompts
    check: dict
    asked = tgt.cfg.eval.prompts
    check: dict
    if not asked:
        check = {"skipped": "no eval.prompts"}
        print("export-gguf: fine-tune check skipped: the run has no eval.prompts to answer")
    elif not llama_cpp_installed():
        check = {"skipped": "llama-cpp-python is not installed"}
        print("export-gguf: fine-tune check skipped: llama-cpp-python is not installed "
              "(pip install llama-cpp-python, or loralab's dev extra, to check the files keep the fine-tune's answers)")
    else:
        check_start = time.perf_counter()
        tokens = min(tgt.cfg.eval.max_new_tokens, CHECK_MAX_NEW_TOKENS)
        print(f"export-gguf: checking the fine-tune survives: the run's {len(asked)} eval.prompts, at most {tokens} "
              f"new tokens, answered greedily by each GGUF in llama.cpp and by the merged and base models")
        prompts = [conversation_prompt_ids(tokenizer, template, [{"role": "user", "content": p}]) for p in asked]
        eos = [tokenizer.eos_token_id]
        merged_answers = generate_greedy(model.float(), prompts, max_new_tokens=tokens, eos_token_ids=eos,
                                         progress=False)
        del model  # freed before the check loads the base model
        check = check_fine_tune(tgt, merged_answers, prompts, tokens, ggufs, eos)
        print(f"export-gguf: fine-tune check done ({time.perf_counter() - check_start:.0f} s)")
    return check
