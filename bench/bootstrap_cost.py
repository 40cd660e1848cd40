"""What eval's paired bootstrap (loralab.intervals.metric_changes) adds to an eval: 50 held-out prompts of real
Alpaca answers, 1,000 resamples, timed beside the per-prompt scoring eval does anyway (metrics.example_scores for
predictions.jsonl), which the bootstrap reuses. Prints medians of several repeats and the ratio.

    python bench/bootstrap_cost.py [--prompts 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from loralab.devices import cpu_has_native_bf16, cpu_model_name
from loralab.intervals import metric_changes
from loralab.metrics import example_scores

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_en_1k.json"


def _median_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Alpaca-format JSON records")
    args = parser.parse_args(argv)
    outputs = [r["output"] for r in json.loads(args.data.read_text(encoding="utf-8"))]
    n = args.prompts
    refs, base, lora = outputs[:n], outputs[n:2 * n], outputs[2 * n:3 * n]  # three different answer sets

    def scoring():
        return {side: [example_scores(h, r) for h, r in zip(answers, refs, strict=True)]
                for side, answers in (("base", base), ("lora", lora))}

    scores = scoring()
    score_s = _median_seconds(scoring, args.repeats)
    boot_s = _median_seconds(lambda: metric_changes(base, lora, refs, scores=scores), args.repeats)
    print(f"CPU: {cpu_model_name()} ({platform.machine()}), native bf16: {cpu_has_native_bf16()}")
    print(f"{n} prompts, 1,000 resamples, median of {args.repeats}:")
    print(f"  per-prompt scoring eval does anyway : {score_s:.3f} s")
    print(f"  the bootstrap on top (scores reused): {boot_s:.3f} s  ({boot_s / score_s:.2f}x the scoring)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
