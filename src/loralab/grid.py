"""A sweep's grid and seeds: ``--grid lora.r=4,8,16 --grid train.learning_rate=1e-4,2e-4`` read into axes, and the
cells of their product, each a config key -> value mapping with a label that names its run directory. The values are
read as YAML, as `--set` reads them, and checked by building each cell's config (loralab.config.load_config)."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from loralab.config import ConfigError, ExperimentConfig, load_config

# keys a grid may not sweep: they name the run directories the sweep itself lays out, or (train.seeds) --seeds says
FIXED_KEYS = {"name": "the sweep names and places its runs itself; sweep another key",
              "output_dir": "the sweep names and places its runs itself; sweep another key",
              "train.seeds": "give the runs per cell with --seeds N"}


@dataclass(frozen=True)
class Axis:
    """One swept config key and its values, in the order given; ``texts`` are the values as typed."""

    key: str
    values: tuple[Any, ...]
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its value on each axis, in axis order."""

    settings: tuple[tuple[str, Any, str], ...]  # (key, value, value as typed)

    @property
    def overrides(self) -> list[str]:
        """The cell as `--set` overrides of the sweep's config."""
        return [f"{key}={text}" for key, _, text in self.settings]

    @property
    def label(self) -> str:
        """A folder-safe name for the cell, from each key's last part and its value: ``r4-learning_rate1e-4``."""
        parts = [f"{key.rsplit('.', 1)[-1]}{_safe(text)}" for key, _, text in self.settings]
        return "-".join(parts)

    def value(self, key: str) -> Any:
        return next(v for k, v, _ in self.settings if k == key)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", text.strip("[]")).strip("_") or "empty"


def split_values(text: str) -> list[str]:
    """``4,8,16`` -> ["4", "8", "16"]; commas inside brackets stay (``[q_proj,v_proj],[q_proj]`` is two values)."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def parse_axis(text: str) -> Axis:
    """One ``--grid section.key=v1,v2,...``; a ConfigError (one line, saying what to type) when it is malformed or
    lists nothing. Whether the key exists and each value has its type is checked when the cells' configs are built."""
    if "=" not in text:
        raise ConfigError(f"--grid expects section.key=value1,value2,..., got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key:
        raise ConfigError(f"--grid {text!r} names no config key; write section.key=value1,value2,...")
    if key in FIXED_KEYS:
        raise ConfigError(f"--grid {key}: {FIXED_KEYS[key]}")
    texts = [t for t in split_values(raw) if t] if raw.strip() else []
    if not texts:
        raise ConfigError(f"--grid {key}= lists no values; give one or more, comma-separated: {key}=value1,value2")
    values = []
    for t in texts:
        try:
            values.append(yaml.safe_load(t))
        except yaml.YAMLError:
            values.append(t)
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"--grid {key}={raw}: a value is listed twice; list each once")
    return Axis(key, tuple(values), tuple(texts))


def parse_grid(texts: list[str]) -> list[Axis]:
    """Every ``--grid`` argument, in order; a key swept twice is a ConfigError."""
    if not texts:
        raise ConfigError("loralab sweep needs at least one --grid section.key=value1,value2,...")
    axes = [parse_axis(t) for t in texts]
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ConfigError(f"--grid {twice} is given twice; list all its values in one --grid {twice}=v1,v2")
    return axes


def grid_cells(axes: list[Axis]) -> list[Cell]:
    """The product of the axes, the last axis varying fastest."""
    return [Cell(tuple((a.key, v, t) for a, (v, t) in zip(axes, choice, strict=True)))
            for choice in itertools.product(*(list(zip(a.values, a.texts, strict=True)) for a in axes))]


def seed_configs(cfg: ExperimentConfig, seeds: int) -> list[ExperimentConfig]:
    """``cfg`` under the seeds train.seed, train.seed + 1, ... each named ``<name>-seed<S>`` (its own run directory
    beside the others; data.seed, and so the split, stays the same)."""
    return [replace(cfg, name=f"{cfg.name}-seed{seed}", train=replace(cfg.train, seed=seed, seeds=1))
            for seed in range(cfg.train.seed, cfg.train.seed + seeds)]


@dataclass(frozen=True)
class PlannedCell:
    """One cell of a planned sweep: its grid point, its config and how many seeds it runs under."""

    cell: Cell
    config: ExperimentConfig  # named <name>-<cell label>; its seeds' runs are seed_configs of it
    seeds: int

    @property
    def run_configs(self) -> list[ExperimentConfig]:
        """The runs of this cell: one, or one per seed (seed_configs)."""
        return seed_configs(self.config, self.seeds) if self.seeds > 1 else [self.config]


@dataclass(frozen=True)
class Sweep:
    """A sweep planned: its config (``base``, with --set applied), its axes and every cell's config."""

    base: ExperimentConfig
    axes: list[Axis]
    cells: list[PlannedCell]

    @property
    def folder(self) -> Path:
        return Path(self.base.output_dir) / f"{self.base.name}-sweep"

    @property
    def runs(self) -> int:
        return sum(c.seeds for c in self.cells)


def plan_sweep(config_path: str | Path, grid: list[str], overrides: list[str] | None = None,
               seeds: int | None = None) -> Sweep:
    """Every cell's config, built (and so validated) before anything runs; a ConfigError names the bad grid
    value. ``seeds``: runs per cell (None: the config's train.seeds)."""
    overrides = list(overrides or [])
    axes = parse_grid(grid)
    base = load_config(config_path, overrides, warn=False)
    count = base.train.seeds if seeds is None else seeds
    if count < 1:
        raise ConfigError(f"--seeds {count}: give 1 or more seeds")
    cells: list[PlannedCell] = []
    for cell in grid_cells(axes):
        try:
            cfg = load_config(config_path, [*overrides, *cell.overrides, f"name={base.name}-{cell.label}"], warn=False)
        except ConfigError as err:
            raise ConfigError(f"--grid cell {', '.join(cell.overrides)}: {err}") from None
        for other in cells:  # two cells in one run directory, or the same config twice (1e-4 and 0.0001)
            if other.cell.label == cell.label or replace(other.config, name="") == replace(cfg, name=""):
                raise ConfigError(f"--grid cells {', '.join(other.cell.overrides)} and {', '.join(cell.overrides)} "
                                  f"are the same {'run directory' if other.cell.label == cell.label else 'config'}; "
                                  f"list each value once")
        cells.append(PlannedCell(cell, cfg, count))
    return Sweep(base, axes, cells)


