"""`loralab sweep CONFIG --grid section.key=v1,v2 [--grid ...] [--seeds N]`: the config over the product of the grids,
one cell after another, each cell an ordinary run directory (`<name>-<cell>`, or `<name>-<cell>-seed<S>` per seed).

Every cell's config is built, and so checked, before anything runs: a bad grid (an unknown key, a value of the wrong
type, an empty list) is one line and nothing run. The sweep holds the lock of its folder `<output_dir>/<name>-sweep/`,
each run the lock of its own directory. It is resumable: a finished cell's stages are up to date and skipped, and a
cell killed in training resumes from its newest checkpoint. Cells share what does not depend on the grid: the
prepared split (when data and tokenizer settings are the same) and the base model's cached answers and held-out
loss (`<output_dir>/.cache`). After each cell the sweep page `<name>-sweep/sweep.html` is rewritten.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from loralab.config import ExperimentConfig
from loralab.errors import LoralabError
from loralab.files import atomic_write_text
from loralab.grid import PlannedCell, Sweep, plan_sweep
from loralab.reporting.sweep import SweepCell, best_cell, sweep_page
from loralab.runs.fingerprints import evaluated, stage_keys
from loralab.runs.lock import run_lock
from loralab.runs.readers import MissingRunFile, read_run
from loralab.stages import pipeline

PAGE, SPEC = "sweep.html", "sweep.json"


def cell_runs(planned: PlannedCell) -> SweepCell:
    """What the cell's finished runs hold, for the page (a run not finished for this config is left out)."""
    runs = []
    for cfg in planned.run_configs:
        if not evaluated(cfg):
            continue
        try:
            runs.append(read_run(cfg.run_dir))
        except (MissingRunFile, ValueError):
            pass  # unreadable files: the page says "not yet"
    settings = tuple((key, text) for key, _, text in planned.cell.settings)
    return SweepCell(planned.cell.label, settings, tuple(runs), planned.seeds)


def write_page(sweep: Sweep, command: str = "") -> Path:
    cells = [cell_runs(c) for c in sweep.cells]
    path = sweep.folder / PAGE
    atomic_write_text(path, sweep_page(sweep.base.name, [a.key for a in sweep.axes], cells, command))
    return path


def _spec(sweep: Sweep, command: str) -> str:
    return json.dumps({
        "command": command, "name": sweep.base.name, "seeds": sweep.cells[0].seeds,
        "grid": [{"key": a.key, "values": list(a.texts)} for a in sweep.axes],
        "cells": [{"label": c.cell.label, "settings": dict((k, t) for k, _, t in c.cell.settings),
                   "run_dirs": [str(cfg.run_dir) for cfg in c.run_configs]} for c in sweep.cells],
    }, indent=2) + "\n"


def _run_cell(planned: PlannedCell, prepared: dict[str, ExperimentConfig], force: bool) -> None:
    """Every run of the cell; its first run takes the prepared split of an earlier cell with the same prepare hash
    (``prepared``, which this cell's first run joins once prepared)."""
    configs = planned.run_configs
    key = stage_keys(configs[0]).prepare.hash
    with run_lock(configs[0].run_dir, "run"):
        if key in prepared:
            pipeline.share_prepare(prepared[key], configs[0])
        if planned.seeds == 1:
            pipeline.run_all(configs[0], force=force, resume=True)
    if planned.seeds > 1:
        pipeline.run_seeds(planned.config, planned.seeds, force=force, resume=True)
    prepared.setdefault(key, configs[0])


def run(config_path: str | Path, grid: list[str], overrides: list[str] | None = None, seeds: int | None = None,
        force: bool = False, command: str = "") -> Path:
    """Run every cell of the sweep in order (see the module docstring); returns the sweep page's path. A cell that
    fails (a diverged run, say) is said, and the sweep goes on to the next; the sweep then ends with one error
    naming the failed cells."""
    sweep = plan_sweep(config_path, grid, overrides, seeds)
    start, failed, prepared = time.perf_counter(), [], {}
    with run_lock(sweep.folder, "sweep"):
        atomic_write_text(sweep.folder / SPEC, _spec(sweep, command))
        page = write_page(sweep, command)
        for i, planned in enumerate(sweep.cells, 1):
            settings = ", ".join(f"{k}={t}" for k, _, t in planned.cell.settings)
            print(f"sweep: cell {i} of {len(sweep.cells)}: {settings} -> {planned.config.run_dir}"
                  + (f" ({planned.seeds} seeds)" if planned.seeds > 1 else ""))
            try:
                _run_cell(planned, prepared, force)
            except LoralabError as err:  # e.g. a diverged learning rate: the other cells still run
                print(f"sweep: cell {i} ({settings}) failed: {err}")
                failed.append(settings)
            page = write_page(sweep, command)
    best = best_cell([cell_runs(c) for c in sweep.cells])
    print(f"sweep: {len(sweep.cells) - len(failed)} of {len(sweep.cells)} cells ({sweep.runs} runs) done in "
          f"{time.perf_counter() - start:.0f} s; best by held-out loss: {best.label if best else 'none'}; page: {page}")
    if failed:
        raise LoralabError(f"{len(failed)} cell(s) of the sweep failed ({'; '.join(failed)}); their errors are above. "
                           f"Fix the cause or drop their values, then rerun the same command: finished cells are kept")
    return page
