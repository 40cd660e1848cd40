"""Finishing or undoing what a killed process left in a run directory: the adapter swap, a finished retrain's swap
and temp files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from loralab.files import completeness, write_json
from loralab.runs.layout import CONFIG_FILE, MANIFEST_FILE, METRICS_FILE, RETRAIN_DIR

NEW_ADAPTER = ".adapter-new"
OLD_ADAPTER = ".adapter-old"

# What a finished retrain replaces: folders moved aside then in, files replaced whole (the manifest last).
RETRAIN_FOLDERS = ("adapter", "checkpoints", "tensorboard")
RETRAIN_FILES = (METRICS_FILE, CONFIG_FILE, MANIFEST_FILE)
SWAP_FILE = "swap.json"  # written into the staging area once the retrain finished: from then on it is swapped in
DONE_RETRAIN = ".retrain-done"  # the emptied staging area on its way out


def swap_in_adapter(saved: Path, adapter_dir: Path) -> None:
    """Move a complete ``.adapter-new`` into place. Every instant is recoverable (recover_interrupted_writes):
    before the first rename the old adapter stands; between the renames the complete new one is beside it."""
    old = adapter_dir.with_name(OLD_ADAPTER)
    shutil.rmtree(old, ignore_errors=True)
    if adapter_dir.exists():
        adapter_dir.rename(old)
    saved.rename(adapter_dir)
    shutil.rmtree(old, ignore_errors=True)


def swap_in_retrain(staging: Path, root: Path) -> None:
    """Replace the run in ``root`` with the finished retrain in ``staging`` (RunDir.retrain_dir, laid out as the run
    directory is, its manifest already the new one). The plan written first is the commit: before it the old run
    stands whole; after it every instant is finished by the next command (recover_interrupted_writes), as the old
    folders are moved aside into the staging area, the new ones moved in, the files replaced (manifest last), and
    the staging area, old folders and all, removed."""
    plan = {"aside": [name for name in RETRAIN_FOLDERS if (root / name).exists()]}
    write_json(staging / SWAP_FILE, plan)
    _finish_retrain_swap(staging, root, plan)


def _finish_retrain_swap(staging: Path, root: Path, plan: dict) -> None:
    """Each step is done once, whenever a kill stopped the one before: a folder moved aside is in ``old``, one moved
    in is gone from the staging area."""
    old = staging / "old"
    old.mkdir(exist_ok=True)
    for name in plan["aside"]:
        if not (old / name).exists() and (root / name).exists():
            (root / name).rename(old / name)
    for name in (*RETRAIN_FOLDERS, *RETRAIN_FILES):
        if (staging / name).exists():
            os.replace(staging / name, root / name)
    done = root / DONE_RETRAIN
    shutil.rmtree(done, ignore_errors=True)
    staging.rename(done)
    shutil.rmtree(done, ignore_errors=True)


def _recover_retrain(root: Path) -> None:
    """A retrain killed during its swap is swapped in; one killed before it finished is left for --resume."""
    staging = root / RETRAIN_DIR
    try:
        plan = json.loads((staging / SWAP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        plan = None
    if isinstance(plan, dict) and isinstance(plan.get("aside"), list):
        _finish_retrain_swap(staging, root, plan)
        print(f"note: finished swapping in a retrain that had finished ({root})")
    shutil.rmtree(root / DONE_RETRAIN, ignore_errors=True)


def recover_interrupted_writes(root: Path) -> None:
    """Finish or undo what a killed process left: a finished retrain and a complete new adapter are swapped in, an
    incomplete adapter and stale temp files are removed, an old adapter left alone in the middle of a swap is put
    back."""
    _recover_retrain(root)
    new, old, adapter = root / NEW_ADAPTER, root / OLD_ADAPTER, root / "adapter"
    if new.is_dir():
        record, _ = completeness(new)
        if record is not None:
            swap_in_adapter(new, adapter)
            print(f"note: finished an adapter save that was interrupted ({adapter})")
        else:
            shutil.rmtree(new, ignore_errors=True)
    if old.is_dir():
        if adapter.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(adapter)
    stale = [p for p in root.glob(".adapter-*") if p.name not in (NEW_ADAPTER, OLD_ADAPTER)]
    stale += [p for folder in (root, root / "data") for p in folder.glob(".*.tmp")]  # atomic_write leftovers
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

