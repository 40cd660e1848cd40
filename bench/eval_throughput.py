"""Evaluation speed: the whole `loralab eval` process and its batched generation vs the per-example loop.

Runs offline on a TinyLlama-1.1B-shaped model (the real config, random weights, a 32,000-token
Llama-style tokenizer trained on the Alpaca texts; built once and cached) and the held-out split of the
shared Alpaca data as `loralab prepare` makes it (64 examples), with a LoRA adapter (r=8, alpha 16 on
q/k/v/o) whose B matrices are perturbed (they start at zero, which would make the adapter a no-op).
Every prompt gets the same max_new_tokens. Three measurements, in one run:

* generation alone, loralab: the adapter merged into the base weights, then `generate_greedy`
  (length-sorted batches, prompts prefilled packed without padding, a KV cache written in place,
  finished rows dropped) on the held-out prompts;
* generation alone, the notebook way: `model.generate(do_sample=False)` one prompt at a time on the
  unmerged PeftModel, on the first --baseline-prompts prompts only (its tokens/s hardly depends on how
  many it runs; the output says so), and how many of those answers are identical to loralab's;
* the whole `loralab eval` process (a subprocess, timed from start to exit: imports, loading, base
  answers, merge, LoRA answers, scoring, writing), cold: no cached base answers. Its tokens/s counts the
  base and LoRA answers' tokens. By default the run's metrics.jsonl holds the two held-out losses as
  `loralab train` logs them (step 0 and the last step) and eval reuses them, as after `loralab run`;
  ``--heldout-loss eval`` makes eval measure both itself (two forward passes over the held-out examples).

It also measures this CPU's matmul peak in the run's dtype (before and after the generation sides) and
prints the share of it each side reaches: "answer-token" counts 2 x non-embedding parameters FLOPs per
generated token (the issue's measure: prefill is overhead), "all-token" counts the prompts' tokens too,
"decode" is the median batched decode step alone. Attention's FLOPs (about 1% here) are not counted.
The CPU is named, with whether it has native bf16 and whether oneDNN/MKL were limited to AVX2
(ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 approximates a CPU without AVX-512).

    python bench/eval_throughput.py --dtype fp32              # 64 prompts, 64 new tokens, baseline on 16
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/eval_throughput.py --dtype fp32
    python bench/eval_throughput.py --dtype bf16 --baseline-prompts 64   # baseline on every prompt (slow)
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_en_1k.json"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loralab" / "bench-eval"
VOCAB_SIZE = 32000
SEED = 42
TARGETS = {"fp32": 5.0, "bf16": 10.0}  # whole-process loralab eval over the per-example loop, tokens/s
TARGET_DECODE_PEAK = 0.60  # batched generation's share of the matmul peak


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="precision of every side")
    parser.add_argument("--prompts", type=int, default=64, help="held-out examples (prompts and loss)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--baseline-prompts", type=int, default=16,
                        help="time the per-example loop on the first N prompts")
    parser.add_argument("--no-whole-process", action="store_true", help="skip the `loralab eval` subprocess")
    parser.add_argument("--heldout-loss", choices=["from-train", "eval"], default="from-train",
                        help="from-train: the run's metrics.jsonl holds the step-0 and last-step held-out losses, as "
                             "`loralab train` leaves them, and eval reuses them; eval: eval measures both itself")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Alpaca-format JSON records")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the random model is kept")
    return parser.parse_args(argv)


def cpu_description() -> str:
    """The CPU's model name, whether it has native bf16, and whether oneDNN/MKL are held to AVX2."""
    name, flags = "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    native = "native bf16 (AVX512-BF16)" if "avx512_bf16" in flags or "amx_bf16" in flags else "no native bf16"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    emulated = f", oneDNN/MKL limited to {isa} (ONEDNN_MAX_CPU_ISA={isa} MKL_ENABLE_INSTRUCTIONS=" \
               f"{os.environ.get('MKL_ENABLE_INSTRUCTIONS', '-')}: an AVX2-only CPU approximated)" if isa else ""
    return f"{name}, {os.cpu_count()} cores, {native}{emulated}"


def matmul_peak(dtype, n: int = 3072, repeats: int = 4) -> float:
    """Best-of-``repeats`` (n x n) @ (n x n) throughput in FLOP/s."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---------------------------------------------------------------- assets


def build_model(cache_dir: Path, data: Path) -> Path:
    """A TinyLlama-shaped random model (bf16 safetensors) and its tokenizer, built once per data file."""
    from loralab.data import user_message, validate_record
    from loralab.models.tiny import TINYLLAMA_CONFIG, build_tinyllama_shape

    key = json.dumps([TINYLLAMA_CONFIG, VOCAB_SIZE, hashlib.sha256(data.read_bytes()).hexdigest()], sort_keys=True)
    model_dir = cache_dir / ("tinyllama-random-" + hashlib.sha256(key.encode()).hexdigest()[:12])
    if not (model_dir / "complete").exists():
        records = [validate_record(r, f"{data}[{i}]") for i, r in enumerate(json.loads(data.read_text()))]
        build_tinyllama_shape(model_dir, [user_message(r) + "\n" + r["output"] for r in records], VOCAB_SIZE)
    return model_dir


def experiment_config(root: Path, model_dir: Path, data: Path, args: argparse.Namespace):
    from loralab.config import DataConfig, EvalConfig, ExperimentConfig, ModelConfig, TrainConfig

    return ExperimentConfig(
        name="eval-bench",
        output_dir=str(root / "runs"),
        model=ModelConfig(name_or_path=str(model_dir)),
        data=DataConfig(path=str(data), num_examples=None, eval_size=args.prompts, seed=SEED, max_length=512),
        train=TrainConfig(precision=args.dtype, device="cpu"),
        eval=EvalConfig(max_new_tokens=args.max_new_tokens),
    )


def prepare_run(root: Path, model_dir: Path, data: Path, args: argparse.Namespace) -> Path:
    """A run directory as `loralab train` would leave it (a perturbed LoRA adapter), and its config file."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loralab.config import dump_config
    from loralab.runs.fingerprints import stage_keys
    from loralab.runs.layout import RunDir
    from loralab.runs.protocol import StageRecords
    from loralab.stages import prepare

    cfg = experiment_config(root, model_dir, data, args)
    prepare.run(cfg)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    torch.manual_seed(SEED)  # LoRA A's initialisation: the same adapter on every run of the bench
    lora = cfg.lora
    model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                            target_modules=list(lora.target_modules)))
    perturb(model)
    rundir = RunDir(cfg)
    model.save_pretrained(rundir.adapter_dir)
    if args.heldout_loss == "eval":
        rundir.metrics_file.write_text("")  # no held-out loss rows: eval computes both losses itself
        StageRecords(rundir).mark_done("train", stage_keys(cfg).train.hash, 0.0, steps=0)
    else:  # the rows `loralab train` logs at step 0 and at its last step, with each held-out example's loss sum and
        # trained-token count as eval reuses them (the values are not checked here, the counts are)
        from loralab.data import trained_token_count
        from loralab.files import read_jsonl

        counts = [trained_token_count(e["labels"]) for e in read_jsonl(rundir.eval_file)]
        rows = [{"step": s, "eval_loss": 10.0, "eval_example_losses": [[10.0 * c, c] for c in counts]} for s in (0, 1)]
        rundir.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        StageRecords(rundir).mark_done("train", stage_keys(cfg).train.hash, 0.0, steps=1)
        rundir.update_manifest(precision=args.dtype, device="cpu")
    path = root / "eval-bench.yaml"
    path.write_text(dump_config(cfg))
    return path


def perturb(model, seed: int = 1) -> None:
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)


# ---------------------------------------------------------------- generation alone


def notebook_generate(peft_model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int) -> list[list[int]]:
    """The per-example loop found in most fine-tuning notebooks: one ``generate`` call per prompt."""
    import torch

    from loralab.generation import cut_at_eos

    outputs = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt])
        with torch.no_grad():
            sequence = peft_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                           max_new_tokens=max_new_tokens, do_sample=False,
                                           eos_token_id=eos_token_id, pad_token_id=eos_token_id)
        outputs.append(cut_at_eos(sequence[0, len(prompt):].tolist(), {eos_token_id}))
    return outputs


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(ours, theirs, strict=False))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                 for a, b in zip(ours, theirs, strict=False)) / len(theirs)
    return f"{same}/{len(theirs)} = {same / len(theirs):.0%} (mean shared prefix {prefix:.1f} tokens)"


def generation_alone(cfg_path: Path, args: argparse.Namespace) -> dict:
    """Both generation sides on the held-out prompts of the prepared run; the matmul peak around them."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loralab.config import load_config
    from loralab.data import make_template, prompt_ids
    from loralab.files import read_jsonl
    from loralab.generation import generate_greedy
    from loralab.models.loading import load_tokenizer
    from loralab.runs.layout import RunDir

    cfg = load_config(cfg_path)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tokenizer = load_tokenizer(cfg.model)
    template = make_template(tokenizer, cfg.data.template)
    rundir = RunDir(cfg)
    prompts = [prompt_ids(tokenizer, template, e["record"]) for e in read_jsonl(rundir.eval_file)]
    eos, new = tokenizer.eos_token_id, args.max_new_tokens
    peaks = [matmul_peak(dtype)]
    started = time.perf_counter()  # the notebook's model load, for the comparison with loads counted on both sides
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=dtype),
                                      str(rundir.adapter_dir)).eval()
    load_s = time.perf_counter() - started
    non_embedding = sum(p.numel() for n, p in model.get_base_model().named_parameters()
                        if "embed_tokens" not in n and "lora_" not in n)
    notebook_generate(model, prompts[:1], 2, eos)  # one-off kernel set-up timed on neither side
    subset = prompts[: args.baseline_prompts]
    started = time.perf_counter()
    theirs = notebook_generate(model, subset, new, eos)
    theirs_s = time.perf_counter() - started

    started = time.perf_counter()
    merged = model.merge_and_unload().eval()
    merge_s = time.perf_counter() - started
    generate_greedy(merged, prompts[:2], max_new_tokens=2, eos_token_ids=[eos], progress=False)
    stamps: list[float] = []
    hook = merged.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    started = time.perf_counter()
    ours = generate_greedy(merged, prompts, max_new_tokens=new, eos_token_ids=[eos], desc="loralab")
    ours_s = time.perf_counter() - started
    hook.remove()
    peaks.append(matmul_peak(dtype))
    steps = sorted(b - a for a, b in itertools.pairwise(stamps))
    return {"prompts": prompts, "ours": ours, "ours_s": ours_s, "merge_s": merge_s, "load_s": load_s,
            "theirs": theirs, "theirs_s": theirs_s,
            "decode_step_s": steps[len(steps) // 2] if steps else float("nan"), "batch": len(prompts),
            "peaks": peaks, "flops_per_token": 2 * non_embedding}


# ---------------------------------------------------------------- the whole process


def whole_process(cfg_path: Path) -> dict:
    """`loralab eval` in a subprocess, timed from start to exit; its manifest's counts."""
    from loralab.config import load_config
    from loralab.runs.layout import RunDir

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "loralab", "eval", str(cfg_path)], env=env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"loralab eval failed:\n{proc.stderr[-4000:]}")
    stage = RunDir(load_config(cfg_path)).manifest()["stages"]["eval"]
    finished = [line.strip() for line in proc.stderr.replace("\r", "\n").splitlines() if "100%" in line]
    bars = list({line.split("100%")[0]: line for line in finished}.values())  # the last line of each bar
    return {"wall_s": wall, "tokens": stage["answer_tokens"], "prompts": stage["prompts"], "bars": bars[-4:],
            "summary": proc.stdout.strip().splitlines()[-1],
            "losses_reused": proc.stdout.count("as loralab train measured it")}


def report(args, gen: dict, whole: dict | None) -> None:
    peak = max(gen["peaks"])
    per_token = gen["flops_per_token"]
    ours_tokens, theirs_tokens = sum(map(len, gen["ours"])), sum(map(len, gen["theirs"]))
    ours_rate = ours_tokens / gen["ours_s"]
    theirs_rate = theirs_tokens / gen["theirs_s"]
    prompt_tokens = sum(map(len, gen["prompts"]))
    n = len(gen["prompts"])
    print(f"\n== CPU: {cpu_description()}; torch threads {__import__('torch').get_num_threads()}")
    print(f"   {args.dtype} matmul peak (3072^3, best of 4, before/after the generation sides): "
          f"{' / '.join(f'{p / 1e9:.0f}' for p in gen['peaks'])} GFLOP/s")
    print(f"   TinyLlama-1.1B shape, random weights, {args.dtype}; {n} held-out Alpaca prompts "
          f"({min(map(len, gen['prompts']))}..{max(map(len, gen['prompts']))} tokens), "
          f"max_new_tokens={args.max_new_tokens}; "
          f"{per_token / 1e9:.2f} GFLOP per token")
    print("\n== generation alone")
    print(f"   loralab generate_greedy, LoRA merged, batched : {ours_tokens:6d} tokens in {gen['ours_s']:7.1f} s = "
          f"{ours_rate:6.2f} tokens/s (merge {gen['merge_s']:.1f} s, not counted)")
    print(f"   per-example model.generate, unmerged PeftModel: {theirs_tokens:6d} tokens in {gen['theirs_s']:7.1f} s = "
          f"{theirs_rate:6.2f} tokens/s (first {len(gen['theirs'])} of {n} prompts)")
    print(f"   speed-up {ours_rate / theirs_rate:.1f}x; identical greedy outputs: "
          f"{agreement(gen['ours'][: len(gen['theirs'])], gen['theirs'])}")
    decode = n * per_token / gen["decode_step_s"] / peak
    print(f"   loralab share of the matmul peak: answer-token {ours_rate * per_token / peak:.0%}, all-token "
          f"{(ours_tokens + prompt_tokens) * per_token / gen['ours_s'] / peak:.0%}, decode at batch {n} {decode:.0%} "
          f"(median step {gen['decode_step_s']:.2f} s); target >= {TARGET_DECODE_PEAK:.0%}: "
          f"{'met' if decode >= TARGET_DECODE_PEAK else 'MISSED'} (decode)")
    if whole is None:
        return
    rate = whole["tokens"] / whole["wall_s"]
    target = TARGETS[args.dtype]
    losses = ("held-out losses reused from metrics.jsonl, as after `loralab train`" if args.heldout_loss == "from-train"
              else "both held-out losses measured by eval")
    print(f"\n== the whole `loralab eval` process (cold: no cached base answers; {losses}: "
          f"{whole['losses_reused']} of 2 reused)")
    print(f"   {whole['prompts']} held-out prompts + the fixed ones, base and LoRA: {whole['tokens']} answer tokens in "
          f"{whole['wall_s']:.1f} s = {rate:.2f} tokens/s; {rate / theirs_rate:.1f}x the per-example loop "
          f"(target >= {target:.0f}x: {'met' if rate / theirs_rate >= target else 'MISSED'})")
    # the notebook way over the same answers, its one model load counted too (loralab's process counts its own)
    theirs_whole = whole["tokens"] / (gen["load_s"] + whole["tokens"] / theirs_rate)
    print(f"   with model loads counted on both sides (the per-example loop's load {gen['load_s']:.1f} s, then "
          f"{whole['tokens']} tokens at its rate): {theirs_whole:.2f} tokens/s -> {rate / theirs_whole:.1f}x")
    generating = sum(bar_seconds(bar) for bar in whole["bars"] if "held-out loss" not in bar)
    measuring = sum(bar_seconds(bar) for bar in whole["bars"] if "held-out loss" in bar)
    print(f"   where the process's {whole['wall_s']:.1f} s go: generation (base and LoRA answers) {generating:.1f} s, "
          f"held-out losses measured {measuring:.1f} s, the rest (imports, model load, LoRA merge "
          f"{gen['merge_s']:.1f} s as measured above, scoring, writing) "
          f"{whole['wall_s'] - generating - measuring:.1f} s")
    for bar in whole["bars"]:
        print(f"     {bar}")
    print(f"   {whole['summary']}")


def bar_seconds(bar: str) -> float:
    """The elapsed time a finished tqdm bar shows ("[01:23<00:00, ...]" or "[1:02:03<...")."""
    elapsed = bar.rsplit("[", 1)[-1].split("<", 1)[0]
    seconds = 0.0
    for part in elapsed.split(":"):
        seconds = 60 * seconds + float(part)
    return seconds


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.data.exists():
        sys.exit(f"no Alpaca data at {args.data}; pass --data")
    model_dir = build_model(args.cache_dir, args.data)
    with tempfile.TemporaryDirectory(prefix="loralab-eval-bench-") as tmp:
        cfg_path = prepare_run(Path(tmp), model_dir, args.data, args)
        gen = generation_alone(cfg_path, args)
        whole = None if args.no_whole_process else whole_process(cfg_path)
    report(args, gen, whole)


if __name__ == "__main__":
    main()
