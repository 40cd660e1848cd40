"""The run directory's lock: one loralab process writes a run directory at a time."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
from pathlib import Path

from loralab.errors import LoralabError
from loralab.runs.recovery import recover_interrupted_writes

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # Windows: the lock file's PID alone says whether it is held
    fcntl = None


class RunDirBusy(LoralabError):
    """Another loralab process holds the run directory."""



@contextlib.contextmanager
def run_lock(root: Path, command: str):
    """Hold ``<root>/.lock`` (the holder's PID, host and command) while a stage writes the run directory.

    The kernel's flock says whether the holder is alive: a lock left by a killed process is taken over
    (and said so). A second process gets RunDirBusy naming the holder. On release the file is removed, and
    so is the run directory when this process created it and left it empty. Interrupted writes of an
    earlier holder (the adapter swap, temp folders) are finished or removed once the lock is held.
    """
    root = Path(root)
    created = [d for d in (root, *root.parents) if not d.exists()]  # innermost first: removed in this order
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = _acquire(root / LOCK_FILE, command)
    except OSError as err:
        raise LoralabError(f"cannot write to {root} ({err.strerror or err}); choose a writable output_dir "
                           f"or fix the folder's permissions") from None
    try:
        recover_interrupted_writes(root)
        yield
    finally:
        (root / LOCK_FILE).unlink(missing_ok=True)  # while still held, so no one locks a file about to vanish
        os.close(fd)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: a failed first stage leaves no output_dir behind


def _acquire(path: Path, command: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            holder = _read_holder(fd)
            if not _try_lock(fd, holder):
                raise RunDirBusy(f"{path.parent} is in use by `loralab {holder.get('command', '?')}` (PID "
                                 f"{holder.get('pid', '?')} on {holder.get('host', '?')}, "
                                 f"since {holder.get('since', '?')}); "
                                 f"wait for it to finish, or give this run another name")
            try:
                same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder released (and removed) it between our open and our lock: try again
                os.close(fd)
                continue
            if holder.get("pid"):
                print(f"note: {path.parent} was locked by PID {holder['pid']} on {holder.get('host')}, which is "
                      f"no longer running (killed?); taking over")
            os.ftruncate(fd, 0)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": _now()}
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            return fd
        except BaseException:
            os.close(fd)
            raise


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _try_lock(fd: int, holder: dict) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True  # the kernel (NFS too, since Linux 2.6.12) releases a dead holder's flock
    pid = holder.get("pid")
    return not (pid and holder.get("host") == socket.gethostname() and _pid_alive(pid))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True



def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

