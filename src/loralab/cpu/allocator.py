"""glibc's malloc tuned for the row length of a CPU training run: heap-speed elementwise ops on short rows.

Allocations at or above the mmap threshold are mmap'd and go back to the system when freed; smaller ones
come from the heap, which keeps freed memory for reuse. Each mmap'd block is fresh zeroed pages, on which
elementwise ops run several times slower than on reused heap memory; the heap's kept memory, on the other
hand, adds to the peak on long rows. docs/benchmarks.md has the measured trade.
"""

from __future__ import annotations

import ctypes
import os
import platform

from loralab.cpu.catalogue import LEAN_ALLOCATOR_ROW_TOKENS

LEAN_MMAP_THRESHOLD = 4 << 20
FAST_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its moving threshold (64-bit), fixed from the start
# Heap kept between steps on short rows: each step frees its activations at the end of the backward; trimmed back,
# the next step faults every page of them in again (bench/step_profile.py counts the page faults per step).
FAST_TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
PRIMITIVE_CACHE_ENTRIES = 128  # ideep's own default is 1,024


def bound_primitive_cache() -> None:
    """Cap the oneDNN matmul primitives PyTorch's ideep layer keeps for reuse (its LRU_CACHE_CAPACITY) at
    PRIMITIVE_CACHE_ENTRIES, unless the user set it.

    Packed rows of training have a new length almost every step, and each length gets its own primitives for every
    weight shape, forward and backward, each holding scratch memory: at ideep's default the resident memory of a
    training run grows for hundreds of steps (bench/step_profile.py prints the peak; docs/benchmarks.md the run).
    A capped cache costs nothing measurable, since a row length rarely comes back. ideep reads the variable once, at
    the process's first oneDNN matmul: the command line sets it before anything is imported."""
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(PRIMITIVE_CACHE_ENTRIES))


def _glibc():
    """glibc through ctypes, or None where the C library is not glibc (not Linux, or it cannot be loaded)."""
    if platform.system() != "Linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    libc = _glibc()
    if libc is None:
        return False
    try:
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except AttributeError:
        return False


def lean(longest_row_tokens: int, checkpointing: bool = False,
         fast_row_tokens: int = LEAN_ALLOCATOR_ROW_TOKENS) -> bool:
    """Whether tune_allocator gives freed memory back at once (LEAN_MMAP_THRESHOLD) rather than keeping the heap: for
    rows over ``fast_row_tokens`` (LEAN_ALLOCATOR_ROW_TOKENS, or more for a model whose longer rows' activations are
    small: decisions.fast_row_tokens), and for ``checkpointing`` (see tune_allocator). loralab.planning.memory counts
    the heap by the same rule."""
    return longest_row_tokens > fast_row_tokens or checkpointing


def mmap_threshold_for(longest_row_tokens: int, checkpointing: bool = False,
                       fast_row_tokens: int = LEAN_ALLOCATOR_ROW_TOKENS) -> int:
    """The mmap threshold tune_allocator sets for rows of up to ``longest_row_tokens``."""
    return LEAN_MMAP_THRESHOLD if lean(longest_row_tokens, checkpointing, fast_row_tokens) else FAST_MMAP_THRESHOLD


def tune_allocator(longest_row_tokens: int, checkpointing: bool = False,
                   fast_row_tokens: int = LEAN_ALLOCATOR_ROW_TOKENS) -> int | None:
    """Set glibc's mmap threshold for rows of up to ``longest_row_tokens``; return it (None: not glibc).

    Rows of up to ``fast_row_tokens`` (see lean) use FAST_MMAP_THRESHOLD and train at heap speed (and the heap's
    free top is only given back above FAST_TRIM_THRESHOLD, so that a step's activations reuse the last step's pages:
    the peak is the same, the memory between steps stays at it); longer rows use
    LEAN_MMAP_THRESHOLD, because there the heap's kept memory adds gigabytes to the peak. So do checkpointed runs
    where cpu.catalogue's CpuPieces.lean_when_checkpointing says so (``checkpointing``): in fp32 each layer's
    recomputed activations, freed into the heap layer after layer, keep gigabytes more than lean
    (bench/plan_validation.py measures it; docs/benchmarks.md). The setting stays for
    the process: once set, glibc no longer moves its threshold with freed blocks, and a fixed default (128 KiB)
    would mmap, and so slow down, every mid-sized tensor afterwards.
    """
    threshold = mmap_threshold_for(longest_row_tokens, checkpointing, fast_row_tokens)
    trim = 2 * threshold if threshold == LEAN_MMAP_THRESHOLD else FAST_TRIM_THRESHOLD
    return threshold if _set_thresholds(threshold, trim) else None


def return_freed_memory() -> bool:
    """Hand the free memory glibc's heap holds back to the system (malloc_trim); False where that is not glibc.

    After the weights take oneDNN's layout (loralab.cpu.onednn_weights) the released plain weights may sit in
    the heap as free blocks, depending on how the allocator placed them at load: then activations reuse them,
    or not, and the peak moves by up to a copy of the weights from run to run. Handed back, the run's memory
    is what `loralab plan` counts (weights, their oneDNN copies, activations) every time.
    """
    libc = _glibc()
    if libc is None:
        return False
    try:
        libc.malloc_trim(0)
    except AttributeError:
        return False
    return True
