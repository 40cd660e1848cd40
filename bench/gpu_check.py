"""The measurements of bench/gpu_check.sh on one NVIDIA GPU, written to one summary file.

On the TinyLlama-1.1B shape (random weights, the shared Alpaca data, encoded by loralab's prepare; the assets
of bench/train_throughput.py), for each precision the card trains in (fp16 with loss scaling; bf16 on compute
capability 8.0+):

* 20 optimizer steps of the reference recipe with `loralab train`'s trainer and with the seed-style HF Trainer +
  PEFT (batch 1 x accumulation 8, fp32 weights under the Trainer's fp16/bf16 autocast), side by side:
  tokens/s after the warm-up steps, peak GPU memory (torch.cuda.max_memory_allocated), the losses;
* `loralab plan --device auto`'s prediction for the same run against loralab's measured peak memory and step time;
* batched greedy decoding (loralab.generation.generate_greedy) of Alpaca prompts, generated tokens/s.

    python bench/gpu_check.py --out gpu_check_out            # on the GPU machine (bench/gpu_check.sh runs it)
    python bench/gpu_check.py --dry-run                       # parse, find the inputs, say what would run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402  (the bench's assets, configs and clock, shared)

STEPS = 20
WARMUP = 2
EVAL_PROMPTS = 32
EVAL_NEW_TOKENS = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder of the summary file")
    parser.add_argument("--data", type=Path, default=tt.DEFAULT_DATA, help="Alpaca-format JSON records")
    parser.add_argument("--cache-dir", type=Path, default=tt.DEFAULT_CACHE, help="where the bench assets are kept")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per side (warm-up included)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the inputs and print what would run; no GPU needed")
    return parser.parse_args(argv)


def loralab_side(root: Path, data: Path, precision: str, steps: int) -> dict:
    import torch

    from loralab import decisions
    from loralab.models.loading import read_model_config
    from loralab.planning.inputs import PlanInputs
    from loralab.planning.measure import profile_for
    examples = tt.load_examples(root, data, steps * tt.EXAMPLES_PER_STEP)
    cfg = tt.experiment_config(root, data, max_steps=steps)
    cfg.train.device, cfg.train.precision = "cuda", precision
    clock = tt.make_clock()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        trainer, switches = tt.loralab_trainer(cfg, examples, Path(tmp), [clock])
        tt.decoder_of(trainer.model).register_forward_pre_hook(clock.count_tokens, with_kwargs=True)
        trainer.train()
    result = clock.result(WARMUP) | {"peak_gpu_bytes": torch.cuda.max_memory_allocated()}
    del trainer
    torch.cuda.empty_cache()
    # What `loralab plan --device auto` predicts for this run, from the same lengths.
    from loralab.devices import probe

    lengths, trained = decisions.example_lengths(examples)
    inputs = PlanInputs(read_model_config(cfg.model), cfg.lora, cfg.train, lengths, profile_for(probe("cuda")), trained,
                        cfg.model.attn_implementation)
    predicted = decisions.plan_run(inputs, switches.precision, with_suggestions=False)
    step_s = sorted(result["step_seconds"])[len(result["step_seconds"]) // 2]
    result["plan"] = {"peak_bytes": predicted.peak_bytes, "step_seconds": predicted.step_seconds,
                      "memory_error": predicted.peak_bytes / result["peak_gpu_bytes"] - 1,
                      "time_error": predicted.step_seconds / step_s - 1, "device": predicted.device.description}
    return result


def seed_side(root: Path, data: Path, precision: str, steps: int) -> dict:
    import torch

    examples = tt.load_examples(root, data, steps * tt.EXAMPLES_PER_STEP)
    clock = tt.make_clock()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        trainer = tt.plain_trainer(root, examples, steps, Path(tmp), [clock], bf16_weights=False, device="cuda",
                                   autocast=precision)
        tt.decoder_of(trainer.model).register_forward_pre_hook(clock.count_tokens, with_kwargs=True)
        trainer.train()
    result = clock.result(WARMUP) | {"peak_gpu_bytes": torch.cuda.max_memory_allocated()}
    del trainer
    torch.cuda.empty_cache()
    return result


def batched_eval(root: Path, data: Path, precision: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.data import make_template, prompt_ids, validate_record
    from loralab.generation import generate_greedy
    from loralab.models.loading import DTYPES

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=DTYPES[precision]).to("cuda").eval()
    records = [validate_record(r, f"{data}[{i}]") for i, r in enumerate(json.loads(data.read_text())[:EVAL_PROMPTS])]
    template = make_template(tokenizer, "auto")
    prompts = [prompt_ids(tokenizer, template, r) for r in records]
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    outputs = generate_greedy(model, prompts, max_new_tokens=EVAL_NEW_TOKENS, eos_token_ids=[eos],
                              progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = sum(len(o) for o in outputs)
    return {"prompts": len(prompts), "generated_tokens": generated, "seconds": seconds,
            "tokens_per_s": generated / seconds}


def summary_lines(device: str, results: dict) -> list[str]:
    lines = [f"# loralab GPU check on {device}", "",
             "| precision | side | tokens/s | peak GPU memory | vs seed-style |", "|---|---|---|---|---|"]
    for precision, sides in results["train"].items():
        seed = sides["seed"]["tokens_per_s"]
        for side in ("loralab", "seed"):
            r = sides[side]
            lines.append(f"| {precision} | {side} | {r['tokens_per_s']:.0f} | {r['peak_gpu_bytes'] / 1e9:.2f} GB | "
                         f"{r['tokens_per_s'] / seed:.2f}x |")
    lines += ["", "| precision | plan peak | measured | error | plan step | measured | error |",
              "|---|---|---|---|---|---|---|"]
    for precision, sides in results["train"].items():
        r, p = sides["loralab"], sides["loralab"]["plan"]
        step = sorted(r["step_seconds"])[len(r["step_seconds"]) // 2]
        lines.append(f"| {precision} | {p['peak_bytes'] / 1e9:.2f} GB | {r['peak_gpu_bytes'] / 1e9:.2f} GB | "
                     f"{100 * p['memory_error']:+.0f}% | {p['step_seconds']:.3f} s | {step:.3f} s | "
                     f"{100 * p['time_error']:+.0f}% |")
    for precision, e in results["eval"].items():
        lines.append(f"\nbatched eval ({precision}): {e['generated_tokens']} tokens from {e['prompts']} prompts, "
                     f"{e['tokens_per_s']:.0f} generated tokens/s")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.exists():
        raise SystemExit(f"data file not found: {args.data} (pass --data)")
    if args.dry_run:
        import loralab.decisions  # noqa: F401  (the package imports)

        print(f"would build or reuse the TinyLlama-shaped assets under {args.cache_dir} from {args.data}")
        print(f"would train {args.steps} steps per side (loralab, seed-style) in fp16 and, "
              "on compute capability 8.0+, bf16")
        print("would compare `loralab plan --device auto` with the measurements, run batched eval, "
              f"write {args.out}/summary.md")
        return 0
    import torch

    from loralab.devices import probe
    from loralab.precision import supported_precisions

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run this on the GPU machine (or pass --dry-run)")
    facts = probe("cuda")
    precisions = [p for p in ("fp16", "bf16") if p in supported_precisions(facts)]
    root = tt.asset_dir(args.cache_dir, args.data)
    tt.build_assets(root, args.data)
    results: dict = {"device": facts.name, "train": {}, "eval": {}}
    for precision in precisions:
        results["train"][precision] = {"loralab": loralab_side(root, args.data, precision, args.steps),
                                       "seed": seed_side(root, args.data, precision, args.steps)}
        results["eval"][precision] = batched_eval(root, args.data, precision)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = "\n".join(summary_lines(facts.name, results)) + "\n"
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
