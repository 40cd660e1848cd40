"""Does `loralab plan` predict what training really takes? Predicted vs measured on this CPU.

Each model is a Llama with random weights built offline in bf16 (built directly in bf16, so the build
never holds an fp32 copy) and saved, in a process of its own; each case loads it with
loralab.models.loading.load_model as `loralab train` does, adds LoRA r=8 on q/k/v/o through
loralab.models.loading.add_lora (fp32 LoRA weights) set up as `loralab train` sets it up on a CPU
(cpu.speed_path.speed_path: fused LoRA layers, per-example attention; frozen weights in oneDNN's layout where the
plan's train.onednn_weights "auto" says so, as loralab.stages.train does), and runs the trainer's micro-batch by
hand: one example per micro-batch packed by loralab.packing.pack_examples, loralab.loss.response_loss_sum,
backward, gradient clipping, AdamW.
Every case runs in its own subprocess, so one case's memory never shows in another's.

* peak memory: the process's peak RSS over the training steps (VmHWM, reset through
  /proc/self/clear_refs after the model is loaded; ru_maxrss of the whole process where that is not
  allowed). The worker imports loralab.stages.train first, so it holds the libraries a training process holds.
* step time: the median of a few steps after a warm-up step, against plan's time per micro-batch.
  By default each case runs on one thread and is timed by the process's CPU time, with the matmul
  peaks measured the same way just before: the result then does not depend on other jobs sharing the
  machine (wall-clock times on a busy 2-core machine can run 10x long). --threads 0 times torch's default
  threads by the wall clock against the cpu profile's 2-thread peaks, for a quiet machine.

Cases: the tiny model of the tests and the demo (hidden 64, 2 layers, vocab 1000) and a
TinyLlama-1.1B-shaped one (real config), at 256 and 1024 tokens, and the latter with gradient
checkpointing. Targets: memory within 15%, time within 30%.

    python bench/plan_validation.py               # five cases, about 5 minutes
    python bench/plan_validation.py --calibrate   # fit the cpu profile's constants on other shapes
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/plan_validation.py --cases tiny,tinyllama-1.1b
        # an AVX2 CPU approximated: fp32 (what train.precision auto picks there), the fp32 speed path's pieces

--calibrate prints the micro-benchmarks behind the cpu profile (SDPA attention efficiency by
head_dim, memory bandwidth, dropout-mask cost) and fits its matmul efficiency, per-layer/per-step host
overheads and framework memory on shapes that are not validated: a TinyLlama-width model with 4
layers at 512 tokens (efficiency) and 1- and 4-layer hidden-32 models at 64 tokens (overheads,
framework memory). The fitted numbers are copied by hand into PROFILES["cpu"] in loralab/planning/profiles.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

from loralab import IGNORE_INDEX, decisions
from loralab.config import LoraSection, TrainConfig
from loralab.models.tiny import TINYLLAMA_CONFIG
from loralab.planning.inputs import PlanInputs
from loralab.planning.measure import cpu_profile
from loralab.planning.profiles import PROFILES

LORA = LoraSection(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
TINY_CONFIG = dict(TINYLLAMA_CONFIG, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
MICRO_CONFIG = dict(TINY_CONFIG, vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
# (name, config, tokens, steps, gradient checkpointing)
CASES = [
    ("tiny", TINY_CONFIG, 256, 12, False),
    ("tiny", TINY_CONFIG, 1024, 12, False),
    ("tinyllama-1.1b", TINYLLAMA_CONFIG, 256, 4, False),
    ("tinyllama-1.1b", TINYLLAMA_CONFIG, 1024, 3, False),
    ("tinyllama +ckpt", TINYLLAMA_CONFIG, 1024, 3, True),
]
CALIBRATION = [
    ("tinyllama-width x4 layers", dict(TINYLLAMA_CONFIG, num_hidden_layers=4), 512, 4, False),
    ("micro x1 layer", MICRO_CONFIG, 64, 20, False),
    ("micro x4 layers", dict(MICRO_CONFIG, num_hidden_layers=4), 64, 20, False),
]
PROMPT_FRACTION = 0.2  # the first fifth of each example is prompt (masked), about Alpaca's share


def example(tokens: int, vocab: int) -> tuple[list[int], list[int]]:
    import random

    rng = random.Random(tokens)
    ids = [rng.randrange(3, vocab) for _ in range(tokens)]
    prompt = int(tokens * PROMPT_FRACTION)
    return ids, [IGNORE_INDEX] * prompt + ids[prompt:]


def _rss_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_rss_peak() -> bool:
    """Set the peak-RSS mark to the current RSS (Linux 4.0+); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build(spec: dict) -> dict:
    """Build a random Llama in bf16 and save it to spec["folder"]. Runs in its own process, so the
    measuring worker loads the model as a fresh `loralab train` process would, never having built one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # Built straight in bf16: the same weights as LlamaForCausalLM(config).to(bf16), without the fp32 copy.
    torch.set_default_dtype(torch.bfloat16)
    LlamaForCausalLM(LlamaConfig(**spec["config"], attn_implementation="sdpa")).save_pretrained(spec["folder"])
    return {}


def worker(spec: dict) -> dict:
    """Load, train a few steps, return measurements. Runs in a fresh process."""
    if spec.get("build"):
        return build(spec)
    import torch

    import loralab.stages.train  # noqa: F401  (the libraries a `loralab train` process holds: Trainer, accelerate)
    from loralab import devices
    from loralab.config import ModelConfig
    from loralab.cpu.catalogue import training_pieces
    from loralab.cpu.speed_path import speed_path as cpu_speed_path
    from loralab.loss import response_loss_sum
    from loralab.models.loading import add_lora, load_model
    from loralab.packing import pack_examples
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    # As `loralab train` loads it: mapped from the file, or read into memory when its weights will take oneDNN's
    # layout (so the plain copies released then go back to the system).
    precision = spec["precision"]
    model = load_model(ModelConfig(name_or_path=spec["folder"]), precision, "cpu", in_memory=spec["onednn"])
    model = add_lora(model, LORA)
    # What `loralab train` runs on a CPU (cpu.speed_path.speed_path), held until this function returns: fused LoRA
    # layers and norms, per-example attention, the allocator set for the row, oneDNN weights as the plan decided.
    speed_path = contextlib.ExitStack()
    pieces = training_pieces(precision, devices.cpu_has_native_bf16())
    switched = speed_path.enter_context(cpu_speed_path(model, spec["tokens"], onednn_weights=spec["onednn"],
                                                       pieces=pieces, checkpointing=spec["checkpointing"]))
    assert switched.per_example_attention is pieces.per_example_attention, switched
    if spec["checkpointing"]:  # as the Trainer sets it up for train.gradient_checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    ids, labels = example(spec["tokens"], spec["config"]["vocab_size"])
    reset = _reset_rss_peak()

    # One thread is timed by the process's CPU time: other jobs on the machine then only slow the wall clock.
    clock = time.process_time if spec.get("threads") == 1 else time.perf_counter
    times = []
    for _ in range(spec["steps"]):
        start = clock()
        batch = pack_examples([{"input_ids": ids, "labels": labels}])
        loss_sum, count = response_loss_sum(model, batch, fused_head=pieces.head_loss)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(clock() - start)
    peak = _rss_peak_bytes()
    speed_path.close()
    return {"peak_rss": peak, "hwm_reset": reset, "step_s": statistics.median(times[1:]), "times": times}


_BUILT: dict[str, tempfile.TemporaryDirectory] = {}  # config -> the folder its model was saved to, this run


def _run_worker(spec: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def measure(config: dict, tokens: int, steps: int, checkpointing: bool, threads: int, onednn: bool = False,
            precision: str = "bf16") -> dict:
    key = json.dumps(config, sort_keys=True)
    if key not in _BUILT:
        _BUILT[key] = tempfile.TemporaryDirectory(prefix="plan-validation-")
        proc = _run_worker({"build": True, "config": config, "folder": _BUILT[key].name})
        if proc.returncode != 0:
            raise SystemExit(f"building the {config['hidden_size']}x{config['num_hidden_layers']} model failed:\n"
                             f"{proc.stderr[-3000:]}")
    proc = _run_worker({"config": config, "folder": _BUILT[key].name, "tokens": tokens, "steps": steps,
                        "checkpointing": checkpointing, "threads": threads, "onednn": onednn, "precision": precision})
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({config['hidden_size']}x{config['num_hidden_layers']}, {tokens} tokens):\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predict(config: dict, tokens: int, checkpointing: bool, profile, onednn: bool | str = "auto",
            precision: str = "bf16"):
    ids, labels = example(tokens, config["vocab_size"])
    trained = sum(1 for x in labels[1:] if x != IGNORE_INDEX)
    train = TrainConfig(per_device_train_batch_size=1, gradient_accumulation_steps=1,
                        gradient_checkpointing=checkpointing, onednn_weights=onednn)
    inputs = PlanInputs(config, LORA, train, [tokens], profile, [trained])
    return decisions.plan_run(inputs, precision, with_suggestions=False)


def validate(profile, threads: int | None, precision: str, cases: list[str] | None = None) -> int:
    from loralab import devices
    limits = devices.isa_limits()
    print(f"plan vs measurement on {profile.description}: {devices.cpu_model_name()}, "
          f"{'native' if devices.cpu_has_native_bf16() else 'no native'} bf16"
          + (f", ISA limited by {limits}" if limits else ""))
    print(f"LoRA r=8 q/k/v/o, {precision} weights, 1 example per micro-batch; {precision} matmul peak used: "
          f"{profile.peak_flops[precision] / 1e9:.0f} GFLOP/s; step time = "
          + ("the process's CPU time" if threads == 1 else "wall clock"))
    header = (f"{'model':<15} {'tokens':>6} {'oneDNN':>6} | {'peak RSS pred':>13} {'measured':>9} {'err':>6} | "
              f"{'step pred':>9} {'measured':>9} {'err':>6}")
    print(header)
    print("-" * len(header))
    worst_mem, worst_time = 0.0, 0.0
    for name, config, tokens, steps, checkpointing in CASES:
        if cases and name not in cases:
            continue
        plan = predict(config, tokens, checkpointing, profile, precision=precision)
        got = measure(config, tokens, steps, checkpointing, threads, plan.onednn_weights, precision)
        mem_err = (plan.peak_bytes - got["peak_rss"]) / got["peak_rss"]
        time_err = (plan.microbatch_seconds - got["step_s"]) / got["step_s"]
        worst_mem, worst_time = max(worst_mem, abs(mem_err)), max(worst_time, abs(time_err))
        print(f"{name:<15} {tokens:>6} {'yes' if plan.onednn_weights else 'no':>6} | "
              f"{plan.peak_bytes / 1e9:>10.2f} GB {got['peak_rss'] / 1e9:>6.2f} GB {100 * mem_err:>+5.0f}% | "
              f"{plan.microbatch_seconds:>8.2f}s {got['step_s']:>8.2f}s {100 * time_err:>+5.0f}%", flush=True)
        if not got["hwm_reset"]:
            print("  (peak RSS includes the model build: /proc/self/clear_refs not allowed here)")
    ok_mem, ok_time = worst_mem <= 0.15, worst_time <= 0.30
    print(f"worst memory error {100 * worst_mem:.0f}% (target 15%: {'met' if ok_mem else 'MISSED'}), "
          f"worst time error {100 * worst_time:.0f}% (target 30%: {'met' if ok_time else 'MISSED'})")
    return 0 if ok_mem and ok_time else 1


def micro_benchmarks(peak_bf16: float, threads: int | None) -> None:
    """Attention efficiency by head_dim, memory bandwidth and dropout-mask cost: the cpu profile's data."""
    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter

    def timed(fn, seconds=1.0):
        fn()
        runs, start = 0, clock()
        while clock() - start < seconds:
            fn()
            runs += 1
        return (clock() - start) / runs

    block = PROFILES["cpu"].attention_block
    for d, heads, kv in [(16, 4, 2), (32, 4, 2), (64, 32, 4), (128, 16, 2)]:
        rates = []
        for n in (256, 1024):
            q = torch.randn(1, heads, n, d, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(1, kv, n, d, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(1, kv, n, d, dtype=torch.bfloat16, requires_grad=True)
            t = timed(lambda q=q, k=k, v=v:
                      F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward())
            pairs = min(n * n, n * n / 2 + n * block / 2)
            rates.append(4 * heads * d * pairs * 3.5 / t)
        print(f"attention head_dim {d:>3}: {statistics.fmean(rates) / 1e9:5.1f} GFLOP/s = "
              f"{statistics.fmean(rates) / peak_bf16:.2f} of the bf16 matmul peak")
    a, b, c = torch.randn(1 << 24), torch.randn(1 << 24), torch.empty(1 << 24)
    print(f"bandwidth (torch.add, 64 MB fp32): {12 * (1 << 24) / timed(lambda: torch.add(a, b, out=c)) / 1e9:.0f} GB/s")
    print(f"dropout mask: {timed(lambda: c.bernoulli_(0.95)) / (1 << 24) * 1e9:.1f} ns per element")


def calibrate(profile, threads: int | None) -> int:
    """Fit efficiency, host overheads and framework memory on shapes the validation does not use."""
    micro_benchmarks(profile.peak_flops["bf16"], threads)
    # Zero host overheads and framework memory, so each prediction holds only the device terms.
    bare = replace(profile, efficiency=1.0, op_overhead_s=0.0, step_overhead_s=0.0, framework_bytes=0)
    half = replace(bare, efficiency=0.5)
    results = {}
    for name, config, tokens, steps, checkpointing in CALIBRATION:
        # plain weights: the fitted efficiency is the plain-layout one
        # (onednn_speedup comes from bench/train_throughput.py)
        plan, plan_half = (predict(config, tokens, checkpointing, p, onednn=False) for p in (bare, half))
        got = measure(config, tokens, steps, checkpointing, threads, onednn=False)
        # At efficiency 1 the matmul term is (half - bare); everything else is bare minus that.
        matmul_s = plan_half.microbatch_seconds - plan.microbatch_seconds
        results[name] = (matmul_s, plan.microbatch_seconds - matmul_s, plan.peak_bytes, got)
        print(f"{name:<26} {tokens:>5} tokens: step {got['step_s'] * 1e3:8.1f} ms "
              f"(matmul at peak {matmul_s * 1e3:7.1f} ms, "
              f"other device terms {(plan.microbatch_seconds - matmul_s) * 1e3:6.1f} ms), "
              f"peak RSS {got['peak_rss'] / 1e9:.3f} GB "
              f"(tensors predicted {plan.peak_bytes / 1e9:.3f} GB)", flush=True)
    m1, o1, p1, g1 = results["micro x1 layer"]
    m4, o4, _, g4 = results["micro x4 layers"]
    op_overhead = ((g4["step_s"] - m4 - o4) - (g1["step_s"] - m1 - o1)) / 3
    step_overhead = g1["step_s"] - m1 - o1 - op_overhead
    framework = g1["peak_rss"] - p1
    mw, ow, _, gw = results["tinyllama-width x4 layers"]
    efficiency = mw / (gw["step_s"] - ow - 4 * op_overhead - step_overhead)
    print(f"fitted: efficiency={efficiency:.2f} op_overhead_s={op_overhead:.2e} step_overhead_s={step_overhead:.2e} "
          f"framework_bytes={framework / 2**30:.2f} GiB")
    return 0


def _load_warning() -> str | None:
    load = os.getloadavg()[0]
    if load > 0.5:
        return (f"note: load average {load:.1f} before starting: other jobs share the CPU and wall-clock times "
                f"run long (the default --threads 1 times each step by its own CPU time instead)")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibrate", action="store_true", help="fit the cpu profile's constants (other shapes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per case; 1 (default) times steps by CPU time and measures the matmul "
                             "peaks the same way; 0 uses torch's default threads, wall-clock time and the profile's "
                             "peaks")
    parser.add_argument("--measure-peaks", action="store_true", help="with --threads 0: measure the matmul peaks now")
    parser.add_argument("--precision", choices=("bf16", "fp32"),
                        help="default: what train.precision auto picks on this CPU")
    parser.add_argument("--cases", help="comma-separated case names to validate "
                        f"(default all: {', '.join(dict.fromkeys(c[0] for c in CASES))})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    profile = cpu_profile(calibrate=False)  # the reference peaks, replaced below where measured
    threads = args.threads or None
    if threads or args.measure_peaks:
        import torch

        from loralab.planning.measure import matmul_peak

        if threads:
            torch.set_num_threads(threads)
        by_cpu_time = threads == 1
        peaks = {p: matmul_peak(p, seconds=2.0, clock="cpu" if by_cpu_time else "wall") for p in profile.peak_flops}
        what = f"{threads} thread(s), matmul peaks measured now" + (" by CPU time" if by_cpu_time else "")
        profile = replace(profile, peak_flops=peaks, description=f"this CPU ({what})")
    warning = _load_warning()
    if warning and threads != 1:
        print(warning)
    precision = args.precision or profile.default_precision
    cases = args.cases.split(",") if args.cases else None
    return calibrate(profile, threads) if args.calibrate else validate(profile, threads, precision, cases)


if __name__ == "__main__":
    sys.exit(main())
