"""Measuring this machine for a plan: the CPU's matmul peaks (a second or so each, measured on the first plan and
cached per CPU model, ISA limits and thread count), and the profile of the device this process sees or of a named
one.

The I/O layer on top of the planning arithmetic: it times matmuls, reads the machine's memory and writes a cache
file; profiles, the memory model and the time model take what it finds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from loralab import devices
from loralab.devices import DeviceFacts, isa_limits
from loralab.errors import LoralabError
from loralab.files import atomic_write_text
from loralab.planning.profiles import PROFILES, DeviceProfile, cpu_profile_for, gpu_profile, mps_profile
from loralab.precision import supported_precisions


def matmul_peak(precision: str, size: int = 2048, seconds: float = 1.0, clock: str = "wall") -> float:
    """FLOP/s of a square torch.matmul on this CPU, timed for about ``seconds``.

    ``clock``: "wall" (the wall clock); "cpu" (the process's CPU time: with one thread, the speed of a core even while
    other jobs share the machine); "idle" (the better of the wall clock and CPU time per thread: the speed the CPU
    reaches alone, since on a busy machine the process gets only part of its threads' time).
    """
    import torch  # heavy: imported only when a peak is measured

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm-up: thread pool, oneDNN kernel selection
    runs, wall, cpu = 0, time.perf_counter(), time.process_time()
    timer = time.process_time if clock == "cpu" else time.perf_counter
    start = timer()
    while timer() - start < seconds or runs < 2:
        torch.matmul(a, b)
        runs += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    elapsed = {"wall": wall, "cpu": cpu, "idle": min(wall, cpu / torch.get_num_threads())}[clock]
    return 2 * size**3 * runs / elapsed


def idle_matmul_peak(precision: str) -> float:
    """matmul_peak as this CPU reaches it alone (the calibration's measure)."""
    return matmul_peak(precision, clock="idle")


def peaks_cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loralab" / "cpu_matmul_peaks.json"


def calibrated_peaks(facts: DeviceFacts, precisions: list[str], fresh: bool = False) -> tuple[dict[str, float], str]:
    """This CPU's matmul peaks for ``precisions`` and where they come from: measured once per CPU model, ISA limits
    and thread count, then read from peaks_cache_file() (a second plan is instant); ``fresh``: measured again now."""
    import torch  # heavy: imported only when calibrating

    key = f"{facts.name} | {isa_limits() or 'full ISA'} | {torch.get_num_threads()} threads"
    path = peaks_cache_file()
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
        entry = dict(cache[key]) if isinstance(cache.get(key), dict) else {}
    except (OSError, ValueError):
        cache, entry = {}, {}
    missing = [p for p in precisions if fresh or not isinstance(entry.get(p), (int, float))]
    if not missing:
        return ({p: float(entry[p]) for p in precisions},
                f"measured {entry.get('measured', 'earlier')}, cached in {path}")
    entry.update({p: idle_matmul_peak(p) for p in missing}, measured=time.strftime("%Y-%m-%d"))
    cache[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cache, indent=1) + "\n")
    except OSError:
        pass  # an unwritable cache only means measuring again next time
    return {p: float(entry[p]) for p in precisions}, "measured just now"


def cpu_profile(calibrate: bool = True, facts: DeviceFacts | None = None, fresh: bool = False) -> DeviceProfile:
    """The cpu profile for this machine's CPU (or the one ``facts`` describe): its available RAM, the precisions
    loralab allows on it, and its own matmul peaks (calibrated_peaks; ``fresh``: measured again now), or with
    ``calibrate`` False the reference CPU's (no measuring: a train's memory decisions need no time).

    The CPU's name alone does not say its speed ("AMD EPYC" covers generations twice as fast as each other), so a
    plan measures rather than trusts the reference CPU's peaks."""
    import psutil

    facts = facts or devices.probe("cpu")
    if not calibrate:
        return cpu_profile_for(facts, psutil.virtual_memory().total)
    peaks, measured = calibrated_peaks(facts, list(supported_precisions(facts)), fresh)
    return cpu_profile_for(facts, psutil.virtual_memory().total, peaks, measured)


def profile_for(facts: DeviceFacts, calibrate: bool = True, fresh: bool = False) -> DeviceProfile:
    """The profile of the device ``facts`` describe (loralab.devices.probe); a CPU's as cpu_profile gives it."""
    if facts.kind == "cuda":
        return gpu_profile(facts)
    if facts.kind == "mps":
        return mps_profile(facts)
    return cpu_profile(calibrate, facts, fresh)


def resolve_profile(device: str, fresh: bool = False) -> DeviceProfile:
    """A named profile, or ``auto``: the GPU/Mac/CPU this process sees (a CPU with its own matmul peaks, measured
    on the first plan; ``fresh``: again now)."""
    device = device.lower()
    if device == "cpu":
        return cpu_profile(fresh=fresh)
    if device in PROFILES:
        return PROFILES[device]
    if device != "auto":
        raise LoralabError(f"unknown device '{device}' for plan; choose one of {', '.join(PROFILES)} or auto")
    return profile_for(devices.probe(devices.detect_device("auto")), fresh=fresh)
