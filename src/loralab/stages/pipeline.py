"""`loralab run`: every stage in order; each skips itself when its inputs are unchanged. `loralab run --seeds N`:
the same config under N seeds, each into its own run directory, sharing prepare and the base model's cache."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from loralab.config import ExperimentConfig
from loralab.files import atomic_write_text
from loralab.reporting.seeds import seeds_markdown
from loralab.runs.layout import RunDir
from loralab.runs.lock import run_lock
from loralab.runs.protocol import copy_stage
from loralab.runs.readers import read_eval_results
from loralab.stages import evaluate, prepare, report, train


def run_all(cfg: ExperimentConfig, force: bool = False) -> None:
    start = time.perf_counter()
    prepare.run(cfg, force=force)
    train.run(cfg, force=force)
    evaluate.run(cfg, force=force)
    path = report.run(cfg)
    print(f"run: done in {time.perf_counter() - start:.0f} s; report: {path}")


def seed_configs(cfg: ExperimentConfig, seeds: int) -> list[ExperimentConfig]:
    """``cfg`` under the seeds train.seed, train.seed + 1, ... each named ``<name>-seed<S>`` (its own run directory
    beside the others; data.seed, and so the split, stays the same)."""
    return [replace(cfg, name=f"{cfg.name}-seed{seed}", train=replace(cfg.train, seed=seed))
            for seed in range(cfg.train.seed, cfg.train.seed + seeds)]


def run_seeds(cfg: ExperimentConfig, seeds: int, force: bool = False) -> Path:
    """Every stage of ``cfg`` under ``seeds`` seeds (seed_configs), one run directory at a time, each under its
    lock; the later seeds take the first one's prepared data (prepare does not depend on train.seed) and every
    seed reuses the base model's cached answers and loss. Writes <output_dir>/<name>-seeds.md; returns its path."""
    configs = seed_configs(cfg, seeds)
    for i, seeded in enumerate(configs):
        with run_lock(seeded.run_dir, "run"):
            if i and copy_stage(RunDir(configs[0]), RunDir(seeded), "prepare"):
                print(f"prepare: shared from {configs[0].run_dir} (the split does not depend on train.seed)")
            run_all(seeded, force=force and i == 0)
    results = [(c.train.seed, read_eval_results(RunDir(c).eval_results_file)) for c in configs]
    path = Path(cfg.output_dir) / f"{cfg.name}-seeds.md"
    atomic_write_text(path, seeds_markdown(cfg.name, results))
    print(f"run: {seeds} seeds done; mean ± sd over them: {path}")
    return path
