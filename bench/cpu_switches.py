"""Each piece of loralab's CPU speed path measured alone, in one precision: the data behind
loralab.cpu.catalogue.TRAINING.

A TinyLlama-width model (the real hidden, MLP, head and vocabulary sizes, random weights) with fewer layers
(--layers, default 2, so a variant runs in seconds), LoRA r=8 alpha 16 dropout 0.05 on q/k/v/o, trains the
first optimizer steps of 8 real Alpaca examples (the shared data, encoded by bench/train_throughput.py's
cached prepare run) the way loralab.stages.train does: each step's examples packed into rows of up to row_tokens,
loralab.loss.response_loss_sum, backward, clipping, AdamW. Variants:

* all: every piece on (fused LoRA, fused RMSNorm, fused SwiGLU, per-example attention with RoPE in one node a
  row, the frozen-head loss, the tuned allocator), rows of 1,024 tokens;
* no-X: the same with one piece off (PEFT's LoRA forward, transformers' RMSNorm, transformers' SwiGLU, SDPA with
  a block mask and transformers' RoPE, the model's own head on trained positions, glibc's default allocator);
* rows-N: every piece on, rows of up to N tokens (rows-1: each example alone);
* seed: HF + PEFT as the seed runs it (one padded example per micro-batch, the model's own loss).

Each variant runs in a process of its own (the allocator's setting lasts a process), on ONE thread, timed
by that process's CPU time: the machine is shared, and CPU time does not stretch with other jobs as wall
time does. Printed: real tokens per CPU-second (after one warm-up step), each variant's ratio to "all",
and the losses (the same data and seed, so they must agree).

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/cpu_switches.py --precision fp32
    python bench/cpu_switches.py --precision bf16 --variants all,no-attention
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import DEFAULT_CACHE, DEFAULT_DATA, asset_dir, build_assets, load_examples  # noqa: E402

PIECES = ("fused_lora", "fused_norm", "fused_mlp", "per_example_attention", "head_loss", "tuned_allocator")
VARIANTS = ("all", *(f"no-{p}" for p in PIECES), "rows-1", "rows-512", "rows-2048", "seed")
EXAMPLES_PER_STEP = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="fp32")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (TinyLlama has 22)")
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps (after one warm-up step)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    return args


def build_model(root: Path, layers: int, precision: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((root / "model" / "config.json").read_text())
    config.pop("dtype", None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config | {"num_hidden_layers": layers}, attn_implementation="sdpa"))
    model = model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def switch_on(model, variant: str) -> int:
    """The speed path's pieces for ``variant`` (each as cpu.speed_path.speed_path switches it); the row length."""
    from loralab.cpu import allocator, attention, fused_lora, fused_mlp, fused_norm

    off = variant[3:] if variant.startswith("no-") else None
    rows = int(variant[5:]) if variant.startswith("rows-") else 1024
    if off != "per_example_attention":
        attention.use_per_example_attention(model.get_base_model())
        attention.fuse_row_attention(model)
    if off != "fused_lora":
        fused_lora.fuse_lora_layers(model)
    if off != "fused_norm":
        fused_norm.fuse_rms_norms(model)
    if off != "fused_mlp":
        fused_mlp.fuse_swiglu(model)
    if off != "tuned_allocator":
        allocator.tune_allocator(rows)
    return rows


@contextlib.contextmanager
def model_head_loss():
    """response_loss_sum through the model's own head (logits at trained positions) instead of loralab.cpu.head_loss."""
    from loralab.cpu import head_loss

    frozen_plain_head = head_loss.frozen_plain_head
    head_loss.frozen_plain_head = lambda model: None
    try:
        yield
    finally:
        head_loss.frozen_plain_head = frozen_plain_head


def step_loss(model, examples: list[dict], variant: str, rows: int) -> float:
    """Forward and backward of one optimizer step's examples; the step's loss (trained-token mean)."""
    import torch

    from loralab import IGNORE_INDEX
    from loralab.loss import response_loss_sum
    from loralab.packing import pack_examples, plan_rows

    trained = sum(sum(1 for x in e["labels"][1:] if x != IGNORE_INDEX) for e in examples)
    total = 0.0
    if variant == "seed":  # the model's own loss, mean over each example's tokens, averaged over the step
        for e in examples:
            loss = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss
            (loss / len(examples)).backward()
            total += loss.item() / len(examples)
        return total
    with model_head_loss() if variant == "no-head_loss" else contextlib.nullcontext():
        for group in plan_rows([len(e["input_ids"]) for e in examples], rows):
            loss_sum, _ = response_loss_sum(model, pack_examples([examples[i] for i in group]))
            (loss_sum / trained).backward()
            total += loss_sum.item() / trained
    return total


def worker(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    root, variant = Path(job["root"]), job["variant"]
    examples = load_examples(root, Path(job["data"]), (job["steps"] + 1) * EXAMPLES_PER_STEP)
    model = build_model(root, job["layers"], job["precision"])
    rows = switch_on(model, variant) if variant != "seed" else 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    model.train()
    torch.manual_seed(42)
    times, losses = [], []
    for step in range(job["steps"] + 1):
        start = time.process_time()
        losses.append(
            step_loss(model, examples[step * EXAMPLES_PER_STEP : (step + 1) * EXAMPLES_PER_STEP], variant, rows)
        )
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.process_time() - start)
    tokens = sum(len(e["input_ids"]) for e in examples[EXAMPLES_PER_STEP:])
    return {"tokens_per_cpu_s": tokens / sum(times[1:]), "step_cpu_s": times[1:], "losses": losses}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from loralab import devices
    root = asset_dir(args.cache_dir, args.data)
    build_assets(root, args.data)
    limits = devices.isa_limits()
    print(f"CPU: {devices.cpu_model_name()}, {'native' if devices.cpu_has_native_bf16() else 'no native'} bf16"
          + (f"; ISA limited by {limits}" if limits else "")
          + f"; {args.precision}, TinyLlama width x {args.layers} layers, "
          f"1 warm-up + {args.steps} steps of {EXAMPLES_PER_STEP} real Alpaca examples, 1 thread, CPU time")
    results = {}
    for variant in args.variants.split(","):
        job = {"root": str(root), "data": str(args.data), "variant": variant, "layers": args.layers,
               "steps": args.steps, "precision": args.precision}
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        r = results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        ratio = f"{r['tokens_per_cpu_s'] / results['all']['tokens_per_cpu_s']:.3f}x all" if "all" in results else ""
        print(f"  {variant:<28} {r['tokens_per_cpu_s']:7.1f} tokens/CPU-s {ratio:>11}  steps "
              f"{' '.join(f'{s:.2f}' for s in r['step_cpu_s'])} s  losses {' '.join(f'{x:.4f}' for x in r['losses'])}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
