"""`loralab run`: every stage in order; each skips itself when its inputs are unchanged. `loralab run --seeds N`:
the same config under N seeds, each into its own run directory, sharing prepare and the base model's cache."""

from __future__ import annotations

import time
from pathlib import Path

from loralab.config import ExperimentConfig
from loralab.files import atomic_write_text
from loralab.grid import seed_configs
from loralab.reporting.seeds import seeds_markdown
from loralab.runs.fingerprints import stage_keys
from loralab.runs.layout import RunDir
from loralab.runs.lock import run_lock
from loralab.runs.protocol import StageRecords, copy_stage
from loralab.runs.readers import read_eval_results
from loralab.stages import evaluate, prepare, report, train
from loralab.training.checkpoints import checkpoint_to_resume


def run_all(cfg: ExperimentConfig, force: bool = False, resume: bool = False) -> None:
    """Every stage of ``cfg``; with ``resume``, training picks up from this config's newest checkpoint where a
    killed attempt left one (what a rerun sweep does), else it starts as `loralab train` would."""
    start = time.perf_counter()
    prepare.run(cfg, force=force)
    train.run(cfg, force=force, resume=resume and not force and resumable(cfg))
    evaluate.run(cfg, force=force)
    path = report.run(cfg)
    print(f"run: done in {time.perf_counter() - start:.0f} s; report: {path}")


def resumable(cfg: ExperimentConfig) -> bool:
    """Whether the run directory of ``cfg`` holds a complete checkpoint of this config's training to resume, its
    training not finished (a finished one is up to date, nothing to resume)."""
    rundir, key = RunDir(cfg), stage_keys(cfg).train
    records = StageRecords(rundir)
    if records.is_current("train", key.hash):
        return False
    # where train.run trains: beside a finished run (whatever config made it) in .retrain/, else in place
    checkpoints = (rundir.retrain_dir if records.finished_whole("train") else rundir.root) / "checkpoints"
    return checkpoint_to_resume(checkpoints, key.hash, required=False) is not None


def share_prepare(source: ExperimentConfig, dest: ExperimentConfig) -> bool:
    """Give ``dest``'s run directory the prepared split of ``source``'s when prepare would compute the same files
    (its hash is the same: the seeds or the grid do not touch data or tokenizer); returns whether it copied."""
    if source.run_dir == dest.run_dir or stage_keys(source).prepare != stage_keys(dest).prepare:
        return False
    if copy_stage(RunDir(source), RunDir(dest), "prepare"):
        print(f"prepare: shared from {source.run_dir} (the same data, split and tokenizer)")
        return True
    return False


def run_seeds(cfg: ExperimentConfig, seeds: int, force: bool = False, resume: bool = False) -> Path:
    """Every stage of ``cfg`` under ``seeds`` seeds (seed_configs), one run directory at a time, each under its
    lock; the later seeds take the first one's prepared data (prepare does not depend on train.seed) and every
    seed reuses the base model's cached answers and loss. Writes <output_dir>/<name>-seeds.md; returns its path."""
    configs = seed_configs(cfg, seeds)
    for i, seeded in enumerate(configs):
        with run_lock(seeded.run_dir, "run"):
            if i:
                share_prepare(configs[0], seeded)
            run_all(seeded, force=force, resume=resume)
    results = [(c.train.seed, read_eval_results(RunDir(c).eval_results_file)) for c in configs]
    path = Path(cfg.output_dir) / f"{cfg.name}-seeds.md"
    atomic_write_text(path, seeds_markdown(cfg.name, results))
    print(f"run: {seeds} seeds done; mean ± sd over them: {path}")
    return path
