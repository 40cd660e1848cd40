"""`loralab run`: every stage in order; each skips itself when its inputs are unchanged."""

from __future__ import annotations

import time

from loralab.config import ExperimentConfig
from loralab.stages import evaluate, prepare, report, train


def run_all(cfg: ExperimentConfig, force: bool = False) -> None:
    start = time.perf_counter()
    prepare.run(cfg, force=force)
    train.run(cfg, force=force)
    evaluate.run(cfg, force=force)
    path = report.run(cfg)
    print(f"run: done in {time.perf_counter() - start:.0f} s; report: {path}")
