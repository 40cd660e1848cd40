"""Where a whole optimizer step of `loralab train` goes, on the real train stage (loralab.stages.train.run, its
callbacks, trackers and logging included), against the matmul peak measured beside it.

Each optimizer step is cut at the Trainer's own callback events (step begin, before and after the optimizer step,
step end) and by timers around the trainer's training_step (forward and backward, every row of the step), the
gradient clipping and the row collator, so the parts add up to the whole step:

* forward + backward: training_step over the step's rows (loralab.training.trainer.ResponseOnlyTrainer);
* clipping: the Trainer's clip_grad_norm_;
* optimizer: optimizer.step (AdamW on the LoRA parameters);
* scheduler, zero_grad: from the optimizer step to the step's end;
* callbacks, logging, next batch: from the step's end to the next step's begin (loralab's metrics log, checkpoint
  guard and trackers, the Trainer's logging, fetching and collating the next step's rows);
* in-step Python: what is left of the step (between rows, the Trainer's loop).

Model FLOPs utilisation: tokens per step x model FLOPs per token (4 x non-embedding parameters + attention, as
bench/train_throughput.py counts them) over the step's time, against the bf16 (or fp32) matmul peak measured in the
same process before and after training.

    python bench/step_profile.py                     # TinyLlama shape, random weights: 2 warm-up + 8 timed steps
    python bench/step_profile.py --model smollm2     # SmolLM2-135M-Instruct (`loralab fetch smollm2-135m-instruct`)
    python bench/step_profile.py --model smollm2 --ops   # and the timed steps' ops by kind (torch.profiler)

With ``--ops`` torch.profiler records the timed steps and the forward and backward's time is split by op: the linear
layers' matmuls, attention's (batched matmuls, or SDPA's kernels) and everything else, with the MFU a step would
reach were it its matmuls alone: the most that removing every other op could give. The profiler's own cost lands in
"everything else" and in the whole-step times, so a run with ``--ops`` is for the split, not for the speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_model  # noqa: E402  (the SmolLM2 config and its prepared examples)
import train_throughput as tt  # noqa: E402  (the TinyLlama-shape assets, the matmul peak, FLOPs per token)

# the ops whose self time is a matmul of a linear layer (frozen or LoRA; oneDNN's prepacked path or ATen's) and of
# attention; every other op (elementwise passes, softmax, copies, the autograd engine) is "everything else"
LINEAR_OPS = frozenset({"mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::addmm_", "aten::mkldnn_linear",
                        "aten::mkldnn_linear_backward_input", "aten::mkldnn_linear_backward_weights"})
ATTENTION_OPS = frozenset({"aten::bmm", "aten::baddbmm", "aten::baddbmm_",
                           "aten::_scaled_dot_product_flash_attention_for_cpu",
                           "aten::_scaled_dot_product_flash_attention_for_cpu_backward"})
OP_KINDS = ("linear layers' matmuls", "attention's matmuls", "everything else")

PARTS = ("forward + backward", "clipping", "optimizer", "scheduler, zero_grad", "callbacks, logging, next batch",
         "in-step Python")


def make_profiler(ops_from_step: int | None = None):
    """The StepProfile callback; with ``ops_from_step``, torch.profiler records from that step's begin (counted
    from 0) to the end of training."""
    from transformers import TrainerCallback

    class StepProfile(TrainerCallback):
        def __init__(self):
            self.torch_profile = None
            self.events: list[dict] = []
            self.current: dict = {}
            self.pending = {"fwd_bwd": 0.0, "clip": 0.0, "data": 0.0, "tokens": 0}

        def wrap(self, trainer) -> None:
            """Time training_step, clipping and the collator of ``trainer``."""
            step, clip, collate = trainer.training_step, trainer.accelerator.clip_grad_norm_, trainer.data_collator

            def timed(key, fn):
                def inner(*args, **kwargs):
                    start = time.perf_counter()
                    try:
                        return fn(*args, **kwargs)
                    finally:
                        self.pending[key] += time.perf_counter() - start
                return inner

            def collator(batch):
                self.pending["tokens"] += sum(len(ex["input_ids"]) for ex in batch)
                return timed("data", collate)(batch)

            trainer.training_step = timed("fwd_bwd", step)
            trainer.accelerator.clip_grad_norm_ = timed("clip", clip)
            trainer.data_collator = collator

        def on_step_begin(self, args, state, control, **kwargs):
            if ops_from_step is not None and state.global_step == ops_from_step and self.torch_profile is None:
                from torch.profiler import ProfilerActivity, profile

                self.torch_profile = profile(activities=[ProfilerActivity.CPU])
                self.torch_profile.__enter__()
            now, faults = time.perf_counter(), page_faults()
            if self.current:
                self.current["next_begin"], self.current["faults"] = now, faults - self.current["faults_at"]
                self.events.append(self.current)
            self.current = {"begin": now, "faults_at": faults, **self.pending}
            self.pending = {"fwd_bwd": 0.0, "clip": 0.0, "data": 0.0, "tokens": 0}

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.current.update(fwd_bwd=self.pending["fwd_bwd"], clip=self.pending["clip"],
                                pre_opt=time.perf_counter())
            self.pending["fwd_bwd"] = self.pending["clip"] = 0.0

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.current["opt"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.current["end"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            if self.current and "end" in self.current:
                self.current["next_begin"] = time.perf_counter()
                self.current["faults"] = page_faults() - self.current["faults_at"]
                self.events.append(self.current)
            if self.torch_profile is not None:
                self.torch_profile.__exit__(None, None, None)

        def op_self_seconds(self) -> dict[str, float]:
            """Each op's self time in seconds over the recorded steps."""
            return {e.key: e.self_cpu_time_total / 1e6 for e in self.torch_profile.key_averages()}

    return StepProfile()


def op_seconds(self_seconds: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(seconds per OP_KINDS, seconds per op of "everything else") from each op's self time in seconds; the kinds add
    up to the total."""
    kinds = dict.fromkeys(OP_KINDS, 0.0)
    rest: dict[str, float] = {}
    for name, seconds in self_seconds.items():
        kind = OP_KINDS[0] if name in LINEAR_OPS else OP_KINDS[1] if name in ATTENTION_OPS else OP_KINDS[2]
        kinds[kind] += seconds
        if kind == OP_KINDS[2]:
            rest[name] = seconds
    return kinds, rest


def print_ops(self_seconds: dict[str, float], tokens: int, per_token: float, peak: float) -> None:
    """The --ops table: each kind's share of the profiled ops' time, the largest of the rest, and the tokens/s and MFU
    the profiled steps (``tokens`` in all) would have made had they spent their time in the matmuls alone."""
    kinds, rest = op_seconds(self_seconds)
    total = sum(kinds.values())
    print(f"\n   the timed steps' ops by kind (torch.profiler, self time, {total:.1f} s in all):")
    for kind, seconds in kinds.items():
        print(f"   {kind:<32} {seconds:9.3f} {100 * seconds / total:5.1f}%")
    largest = sorted(rest.items(), key=lambda kv: -kv[1])[:8]
    print("   the largest of everything else: " + ", ".join(f"{n} {100 * v / total:.1f}%" for n, v in largest))
    linear, attention = kinds[OP_KINDS[0]], kinds[OP_KINDS[1]]
    for what, seconds in (("its matmuls alone (everything else at no time)", linear + attention),
                          ("its linear layers' matmuls alone", linear)):
        print(f"   were a step {what}: {tokens / seconds:.1f} tokens/s, MFU "
              f"{100 * tokens * per_token / seconds / peak:.1f}%")


def page_faults() -> int:
    """This process's minor page faults so far: each is a page touched for the first time (fresh from the kernel)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def step_parts(event: dict) -> dict[str, float]:
    """One step's seconds per part (PARTS); they add up to the whole step, begin to the next begin."""
    whole = event["next_begin"] - event["begin"]
    parts = {
        "forward + backward": event["fwd_bwd"],
        "clipping": event["clip"],
        "optimizer": event["opt"] - event["pre_opt"],
        "scheduler, zero_grad": event["end"] - event["opt"],
        "callbacks, logging, next batch": event["next_begin"] - event["end"],
    }
    parts["in-step Python"] = whole - sum(parts.values())
    return parts | {"whole step": whole}


def config_for(args, tmp: Path):
    if args.model == "smollm2":
        root = args.cache_dir / "smollm2"
        cfg = real_model.experiment_config(root, real_model.DEFAULT_MODEL, args.data, args.precision,
                                           args.warmup + args.steps)
        real_model.examples_of(root, real_model.DEFAULT_MODEL, args.data, args.precision, args.warmup + args.steps)
        if not (root / "model").exists():
            (root / "model").symlink_to(real_model.DEFAULT_MODEL.resolve())
    else:
        root = tt.asset_dir(tt.DEFAULT_CACHE, args.data)
        tt.build_assets(root, args.data)
        cfg = tt.experiment_config(root, args.data, max_steps=args.warmup + args.steps)
        cfg = replace(cfg, train=replace(cfg.train, precision=args.precision))
    # as a user runs it: the recipe's logging every 10 steps, TensorBoard on (the default), no checkpoint in the window
    train_cfg = replace(cfg.train, logging_steps=10, save_steps=10**6, report_to=["tensorboard"])
    return root, replace(cfg, output_dir=str(tmp), train=train_cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tinyllama", choices=["tinyllama", "smollm2"])
    parser.add_argument("--data", type=Path, default=tt.DEFAULT_DATA)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2)")
    parser.add_argument("--cache-dir", type=Path, default=tt.DEFAULT_CACHE.parent / "bench-step-profile")
    parser.add_argument("--ops", action="store_true",
                        help="record the timed steps with torch.profiler and split their time by op kind (slower)")
    args = parser.parse_args(argv)
    from loralab.cpu.allocator import bound_primitive_cache

    bound_primitive_cache()  # as the command line does, before the process's first oneDNN matmul
    from loralab.devices import probe
    from loralab.files import read_jsonl
    from loralab.precision import choose_precision
    from loralab.stages import prepare, train

    precision = choose_precision(probe("cpu"), args.precision)
    profile = make_profiler(args.warmup if args.ops else None)
    real_build = train.build_trainer

    def build_and_wrap(*a, **k):
        trainer = real_build(*a, **k)
        trainer.add_callback(profile)
        profile.wrap(trainer)
        return trainer

    train.build_trainer = build_and_wrap
    print(f"CPU: {tt.cpu_description()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-step-profile-") as tmp:
        root, cfg = config_for(args, Path(tmp))
        prepare.run(cfg)
        before = tt.matmul_peak(precision)
        train.run(cfg, force=True)
        after = tt.matmul_peak(precision)
        # the attention FLOPs depend on the lengths: those of the first examples stand for the timed steps'
        examples = [{"input_ids": e["input_ids"], "labels": e["labels"]}
                    for e in read_jsonl(Path(cfg.run_dir) / "data" / "train.jsonl")[:200]]
    timed = profile.events[args.warmup :]
    steps = [step_parts(e) for e in timed]
    whole = statistics.median(s["whole step"] for s in steps)
    per_token, _ = tt.flops_per_token(root, examples)
    tokens = statistics.median(e["tokens"] for e in timed)
    peak = max(before["flops"], after["flops"])
    print(f"\n== {args.model}, {precision}, {len(steps)} timed whole optimizer steps of `loralab train` (after "
          f"{args.warmup}); CPU: {tt.cpu_description()}; load average {os.getloadavg()[0]:.1f}")
    print(f"   {'part':<32} {'median s':>9} {'share':>6}")
    for part in PARTS:
        value = statistics.median(s[part] for s in steps)
        print(f"   {part:<32} {value:9.3f} {100 * value / whole:5.1f}%")
    total = sum(statistics.median(s[p] for s in steps) for p in PARTS)
    print(f"   {'whole step (median)':<32} {whole:9.3f}  (sum of the parts' medians {total:.3f})")
    window = statistics.median(s["forward + backward"] for s in steps)
    print(f"   tokens per step (median) {tokens:.0f}: {tokens / whole:.1f} tokens/s in whole steps, "
          f"{tokens / window:.1f} in forward + backward alone")
    faults = statistics.median(e["faults"] for e in timed)
    print(f"   page faults per step (median) {faults:.0f} ({faults * os.sysconf('SC_PAGE_SIZE') / 2**20:.0f} MiB "
          f"touched fresh); peak RSS {tt.peak_rss_bytes() / 1e9:.2f} GB")
    print(f"   model FLOPs per token {per_token / 1e9:.3f} GFLOP (the head at trained positions only); {precision} "
          "matmul peak beside it "
          f"{peak / 1e9:.0f} GFLOP/s; MFU in whole steps {100 * tokens / whole * per_token / peak:.1f}%, "
          f"in forward + backward {100 * tokens / window * per_token / peak:.1f}%")
    if args.ops:
        print("   (under torch.profiler: the times above include its cost)")
        print_ops(profile.op_self_seconds(), sum(e["tokens"] for e in timed), per_token, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
