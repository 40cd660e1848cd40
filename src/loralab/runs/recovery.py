"""Finishing or undoing what a killed process left in a run directory: the adapter swap and temp files."""

from __future__ import annotations

import shutil
from pathlib import Path

from loralab.files import completeness

NEW_ADAPTER = ".adapter-new"
OLD_ADAPTER = ".adapter-old"


def swap_in_adapter(saved: Path, adapter_dir: Path) -> None:
    """Move a complete ``.adapter-new`` into place. Every instant is recoverable (recover_interrupted_writes):
    before the first rename the old adapter stands; between the renames the complete new one is beside it."""
    old = adapter_dir.with_name(OLD_ADAPTER)
    shutil.rmtree(old, ignore_errors=True)
    if adapter_dir.exists():
        adapter_dir.rename(old)
    saved.rename(adapter_dir)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_writes(root: Path) -> None:
    """Finish or undo what a killed process left: a complete new adapter is swapped in, an incomplete one and
    stale temp files are removed, an old adapter left alone in the middle of a swap is put back."""
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

