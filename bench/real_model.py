"""The real model against the tools a user would otherwise run: SmolLM2-135M-Instruct, the reference recipe.

Three sides train the same 20 optimizer steps (LoRA r=8, alpha 16, dropout 0.05 on q/k/v/o_proj, 8 examples per
step, lr 2e-4, no warm-up) on the same real Alpaca examples, encoded once by loralab's prepare stage (ChatML, the
loss on the response tokens only), so every side sees the same input ids and trains the same tokens:

* loralab: the Trainer `loralab train` builds (loralab.stages.train: decide, build_model, build_trainer), with
  train.precision as given (auto: bf16 on a CPU with native bf16, fp32 elsewhere);
* trl: TRL's SFTTrainer with a PEFT LoraConfig and completion-only loss (the dataset given as input_ids and a
  completion_mask, so TRL trains exactly loralab's response tokens), batch 1 x accumulation 8, the base weights in
  the same precision;
* seed: the seed's recipe, a plain HF Trainer with get_peft_model, batch 1 x accumulation 8, a padding collator and
  fp32 weights.

Each side runs in its own subprocess, one after another, with only the step clock as callback and a loss logged
every step. Throughput is real tokens per second in whole optimizer steps (on_step_end to on_step_end, steps 3-20:
forward, backward, optimizer, clipping, logging and data included); memory is the subprocess's peak resident set.
Each side's MFU is against the matmul peak measured before the first side and after the last, at the FLOPs per token
bench/train_throughput.py counts (the LM head where a target is trained), and the 5x (or 2x) target is given as the
MFU it asks for.
The load average is printed beside each side: on a shared machine the figures stretch with it. The losses of
every step are printed for each side; loralab's and TRL's must agree within bf16 noise (they train the same tokens
of the same examples in the same order; the Trainer's seeded sampler orders every side alike).

    python bench/real_model.py                         # bf16 where the CPU has it (about 10 minutes)
    python bench/real_model.py --sides loralab,trl --rounds 3   # medians of 3 interleaved rounds
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/real_model.py --precision fp32

Needs `loralab fetch smollm2-135m-instruct` (models/smollm2-135m-instruct) and TRL (the dev extra pins it).
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402  (the step clock, the seed-style trainer and the CPU's description)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "smollm2-135m-instruct"
STEPS, WARMUP = 20, 2
TARGETS = {"bf16": 5.0, "fp32": 2.0}  # loralab over TRL, whole-step tokens/s (issue 27)
# the largest per-step loss difference loralab vs TRL that is rounding: bf16's 8-bit mantissa over ~1,000 tokens a step
LOSS_TOLERANCE = {"bf16": 0.05, "fp32": 0.005}
SIDES = ("loralab", "trl", "seed")


def experiment_config(root: Path, model: Path, data: Path, precision: str, steps: int = STEPS):
    from loralab.config import DataConfig, ExperimentConfig, LoraSection, ModelConfig, TrainConfig

    return ExperimentConfig(
        name="smollm2", output_dir=str(root / "runs"), model=ModelConfig(name_or_path=str(model)),
        data=DataConfig(path=str(data), num_examples=None, eval_size=0, seed=tt.SEED, max_length=512),
        lora=LoraSection(r=8, lora_alpha=16, lora_dropout=0.05,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        train=TrainConfig(per_device_train_batch_size=1, gradient_accumulation_steps=tt.EXAMPLES_PER_STEP,
                          max_steps=steps, learning_rate=tt.LEARNING_RATE, warmup_steps=0, logging_steps=1,
                          save_steps=10**6, seed=tt.SEED, precision=precision, device="cpu"),
    )


def examples_of(root: Path, model: Path, data: Path, precision: str, steps: int) -> list[dict]:
    """The encoded examples loralab's prepare stage wrote (run once, then up to date)."""
    from loralab.files import read_jsonl
    from loralab.runs.layout import RunDir
    from loralab.stages import prepare

    cfg = experiment_config(root, model, data, precision)
    prepare.run(cfg)
    rows = read_jsonl(RunDir(cfg).train_file)
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows[: steps * tt.EXAMPLES_PER_STEP]]


def trl_trainer(model_dir: Path, examples: list[dict], out_dir: Path, callbacks: list, precision: str, steps: int):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from loralab import IGNORE_INDEX

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if precision == "bf16" else
                                                 torch.float32)
    rows = [{"input_ids": e["input_ids"], "completion_mask": [int(label != IGNORE_INDEX) for label in e["labels"]]}
            for e in examples]
    args = SFTConfig(
        output_dir=str(out_dir), per_device_train_batch_size=1, gradient_accumulation_steps=tt.EXAMPLES_PER_STEP,
        max_steps=steps, learning_rate=tt.LEARNING_RATE, warmup_steps=0, logging_steps=1, save_strategy="no",
        seed=tt.SEED, data_seed=tt.SEED, use_cpu=True, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        completion_only_loss=True, max_length=None, packing=False,
        bf16=precision == "bf16",  # TRL's own default is bf16 autocast, on a CPU too: fp32 must say so
    )
    torch.manual_seed(tt.SEED)
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=peft, callbacks=callbacks)


def run_side(side: str, root: Path, model: Path, data: Path, precision: str, steps: int) -> dict:
    if side == "loralab":  # as the command line does, before the process's first oneDNN matmul
        from loralab.cpu.allocator import bound_primitive_cache

        bound_primitive_cache()
    import torch

    examples = examples_of(root, model, data, precision, steps)
    clock = tt.make_clock()
    with tempfile.TemporaryDirectory(prefix=f"bench-real-{side}-") as tmp:
        if side == "loralab":
            trainer, switches = tt.loralab_trainer(experiment_config(root, model, data, precision, steps), examples,
                                                   Path(tmp), [clock])
            used = switches.precision + (", oneDNN weights" if switches.onednn_weights else "")
        elif side == "trl":
            trainer = trl_trainer(model, examples, Path(tmp), [clock], precision, steps)
            used = f"{next(trainer.model.get_base_model().parameters()).dtype} weights".replace("torch.", "")
        else:
            trainer, used = tt.plain_trainer(root, examples, steps, Path(tmp), [clock], bf16_weights=False), "fp32"
        tt.decoder_of(trainer.model).register_forward_pre_hook(clock.count_tokens, with_kwargs=True)
        load = os.getloadavg()[0]
        trainer.train()
    return clock.result(WARMUP) | {"precision": used, "threads": torch.get_num_threads(),
                                   "load": [load, os.getloadavg()[0]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the SmolLM2 model folder")
    parser.add_argument("--data", type=Path, default=tt.DEFAULT_DATA)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="loralab's train.precision (auto: what `loralab train` picks on this CPU) and TRL's "
                             "weights; the seed-style side stays fp32")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps per side (default {STEPS}; the "
                        f"first {WARMUP} are not timed)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every side this many times, the sides interleaved; the figures are medians, the "
                             "ratios medians of each round's own (on a shared machine one round moves by 10%%)")
    parser.add_argument("--cache-dir", type=Path, default=tt.DEFAULT_CACHE.parent / "bench-real-model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(run_side(job["kind"], Path(job["root"]), Path(job["model"]), Path(job["data"]),
                                  job["precision"], job["steps"])))
        return 0
    if not (args.model / "config.json").exists():
        raise SystemExit(f"no model at {args.model}: run `loralab fetch smollm2-135m-instruct` (or pass --model)")
    root = args.cache_dir
    (root / "model").parent.mkdir(parents=True, exist_ok=True)
    if not (root / "model").exists():
        (root / "model").symlink_to(args.model.resolve())  # the seed-style trainer reads <root>/model
    from loralab.devices import probe
    from loralab.precision import choose_precision

    precision = choose_precision(probe("cpu"), args.precision)  # what loralab picks; TRL's weights follow it
    print(f"CPU: {tt.cpu_description()}; precision {precision}", flush=True)
    sides = args.sides.split(",")
    started, runs = time.perf_counter(), {side: [] for side in sides}
    # prepared here, once, before any side (each side's process then finds it up to date): the FLOPs of the timed
    # steps' examples, the head counted where a target is trained, as loralab computes it
    timed = examples_of(root, args.model, args.data, precision, args.steps)[WARMUP * tt.EXAMPLES_PER_STEP :]
    peaks = [tt.matmul_peak(precision)["flops"]]  # beside the runs: before the first and after the last
    for round_no in range(1, args.rounds + 1):
        for side in sides:
            job = {"kind": side, "root": str(root), "model": str(args.model), "data": str(args.data),
                   "precision": precision, "steps": args.steps}
            r = tt.in_subprocess(job, __file__)
            runs[side].append(r)
            print(f"  round {round_no}: {side:<8} {r['tokens_per_s']:7.1f} tokens/s, peak RSS "
                  f"{r['peak_rss'] / 1e9:.2f} GB, {r['precision']}, load average {r['load'][0]:.1f} -> "
                  f"{r['load'][1]:.1f}", flush=True)
    peaks.append(tt.matmul_peak(precision)["flops"])
    report(runs, precision, args, tt.flops_per_token(root, timed)[0], max(peaks))
    print(f"   (whole benchmark {time.perf_counter() - started:.0f} s)")
    return 0 if meets_targets(runs, precision) else 1


def ratio(runs: dict, side: str, other: str) -> float:
    """The median over rounds of side's tokens/s over other's in the same round."""
    return statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[side], runs[other],
                                                                                     strict=True))


def report(runs: dict, precision: str, args, per_token: float, peak: float) -> None:
    """The table: per side, tokens/s, peak RSS, ratios, and the MFU at ``per_token`` FLOPs against ``peak``."""
    rounds = len(next(iter(runs.values())))
    print(f"\n== SmolLM2-135M-Instruct, {args.steps} optimizer steps x {tt.EXAMPLES_PER_STEP} Alpaca examples, whole "
          f"steps {WARMUP + 1}-{args.steps} timed, {rounds} round(s) (medians); CPU: {tt.cpu_description()}")
    print(f"   model FLOPs per token {per_token / 1e9:.3f} GFLOP (the head at trained positions only); {precision} "
          f"matmul peak beside the runs {peak / 1e9:.0f} GFLOP/s")
    print(f"   {'side':<8} {'tokens/s':>9} {'peak RSS':>9} {'vs trl':>7} {'vs seed':>8} {'MFU':>6}  precision; "
          "load averages")
    for side, rs in runs.items():
        tokens = statistics.median(r["tokens_per_s"] for r in rs)
        rss = max(r["peak_rss"] for r in rs)
        ratios = [f"{ratio(runs, side, k):.2f}x" if k in runs else "-" for k in ("trl", "seed")]
        loads = ", ".join(f"{r['load'][0]:.1f} -> {r['load'][1]:.1f}" for r in rs)
        print(f"   {side:<8} {tokens:9.1f} {rss / 1e9:6.2f} GB {ratios[0]:>7} {ratios[1]:>8} "
              f"{100 * tokens * per_token / peak:5.1f}%  {rs[0]['precision']}; {loads}")
    if rounds > 1:
        for side, rs in runs.items():
            print(f"   {side:<8} each round: " + ", ".join(f"{r['tokens_per_s']:.1f}" for r in rs) + " tokens/s")
    print("   loss at each step (first round):")
    for side, rs in runs.items():
        print(f"   {side:<8} " + " ".join(f"{x:.3f}" for x in rs[0]["losses"]))
    if "loralab" in runs and "trl" in runs:
        gap = loss_gap(runs)
        speedup = ratio(runs, "loralab", "trl")
        print(f"   largest loss difference loralab vs trl: {gap:.4f} (must be <= {LOSS_TOLERANCE[precision]}: "
              f"{'agree' if gap <= LOSS_TOLERANCE[precision] else 'DIFFER'}); target loralab >= "
              f"{TARGETS[precision]:.0f}x TRL ({precision}): {speedup:.2f}x "
              f"{'met' if speedup >= TARGETS[precision] else 'MISSED'}")
        target = TARGETS[precision] * statistics.median(r["tokens_per_s"] for r in runs["trl"])
        print(f"   {TARGETS[precision]:.0f}x TRL's median is {target:.1f} tokens/s: an MFU of "
              f"{100 * target * per_token / peak:.1f}% in whole steps on this CPU")


def loss_gap(runs: dict) -> float:
    return max(abs(a - b) for ra, rb in zip(runs["loralab"], runs["trl"], strict=True)
               for a, b in zip(ra["losses"], rb["losses"], strict=True))


def meets_targets(runs: dict, precision: str) -> bool:
    if "loralab" not in runs or "trl" not in runs:
        return True
    return ratio(runs, "loralab", "trl") >= TARGETS[precision] and loss_gap(runs) <= LOSS_TOLERANCE[precision]


if __name__ == "__main__":
    sys.exit(main())
