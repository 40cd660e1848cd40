"""Files written so that a crash never leaves half of one: atomic writes, JSON lines, sha256, folders swapped in
whole, and the completion marker that says a checkpoint or adapter folder is whole."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class JsonlError(ValueError):
    """A JSON-lines line that is not JSON: ``line`` is its number (from 1), ``why`` the parser's reason."""

    def __init__(self, line: int, why: str):
        super().__init__(f"line {line}: not valid JSON ({why})")
        self.line, self.why = line, why


def parse_jsonl(lines: Iterable[str]) -> list:
    """The values of JSON-lines text (blank lines skipped); the first bad line raises JsonlError."""
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise JsonlError(n, err.msg) from None
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file the run directory holds; a damaged one is a LoralabError naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = parse_jsonl(f)
    except (JsonlError, UnicodeDecodeError, RecursionError) as err:
        where, why = ((f" line {err.line}", "not valid JSON") if isinstance(err, JsonlError)
                      else ("", type(err).__name__))
        raise LoralabError(f"{path}{where} is damaged ({why}); run the stage that writes it again "
                           f"with --force") from None
    except OSError as err:
        raise LoralabError(f"cannot read {path} ({err.strerror or err}); check the file's permissions") from None
    return rows


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_hashes(root: Path, rels: Iterable[str]) -> dict[str, str]:
    """sha256 of each named file under ``root``: what a stage records so a changed or truncated output is noticed."""
    return {rel: file_sha256(root / rel) for rel in rels}


# Crash-safe folders ----------------------------------------------------------------------------------
COMPLETE_FILE = "loralab_complete.json"  # written last into a checkpoint or adapter folder: it is whole


def mark_complete(folder: Path, **info: Any) -> None:
    """Record that ``folder`` is whole: the sha256 of each file in it, written last and atomically."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != COMPLETE_FILE)
    write_json(folder / COMPLETE_FILE, {**info, "files": folder_hashes(folder, files)})


def completeness(folder: Path) -> tuple[dict | None, str | None]:
    """(the completion record, None) for a whole folder, else (None, why it is not)."""
    marker = folder / COMPLETE_FILE
    if not marker.is_file():
        return None, "incomplete (its save was interrupted)"
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"damaged ({COMPLETE_FILE} unreadable)"
    for rel, digest in files.items():
        path = folder / rel
        try:
            if not path.is_file() or file_sha256(path) != digest:
                return None, f"damaged ({rel} changed or truncated)"
        except OSError:
            return None, f"damaged ({rel} unreadable)"
    return record, None



def check_output_dir(dest: Path, overwrite: bool, what: str) -> None:
    """Refuse to write ``what`` into ``dest`` when it holds something, unless ``overwrite``."""
    if dest.exists() and not dest.is_dir():
        raise LoralabError(f"{dest} is a file; give --out a folder for the {what}")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise LoralabError(f"{dest} already holds files; pass --overwrite to replace them, or choose another --out")


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    """Fail before writing when the disk under ``folder`` has less than ``need_bytes`` free."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise LoralabError(
            f"the {what} needs about {need_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free under {probe}; "
            "free some space or choose another --out"
        )


def replace_dir(dest: Path, fill) -> None:
    """Build a folder with ``fill(tmp)`` beside ``dest``, then swap it in; a failure leaves ``dest`` as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    old = dest.parent / f".{dest.name}.old"
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
