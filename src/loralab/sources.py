"""Where a run's data comes from: the one rule that tells a local path from a hub id, and reading the records of
a local file or a hub dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

from loralab.data import DataError
from loralab.files import JsonlError, parse_jsonl
from loralab.hub import prepare_hub_access, why_not_loaded


def looks_local(name: str) -> bool:
    """Whether data.path or model.name_or_path names a local file or folder rather than a hub id ("owner/name"):
    a path that starts with . / ~, has more than one /, uses this OS's separator, or ends in .json, .jsonl or
    .gguf. One that does not exist is then an error, not a hub lookup."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
            or name.endswith((".json", ".jsonl", ".gguf")))


def read_local_records(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}; "
                        "set data.path to a .json/.jsonl file or a hub dataset id") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read data file {path} ({getattr(err, 'strerror', None) or err}); "
                        f"check its permissions and that it is UTF-8 JSON") from None
    try:
        return _parse_records(path, text)
    except RecursionError:
        raise DataError(f"{path} nests JSON too deeply to be Alpaca records; each record is a flat object "
                        f"with 'instruction', 'input' and 'output'") from None


def _parse_records(path: Path, text: str) -> list:
    if path.suffix == ".jsonl":
        try:
            return parse_jsonl(text.splitlines())
        except JsonlError as err:
            raise DataError(f"{path} {err}") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of records")
    return records


def read_hub_records(dataset_id: str, split: str) -> list:
    prepare_hub_access()
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # datasets raises many types (connection, offline mode, missing id)
        raise DataError(
            f"cannot load dataset '{dataset_id}' from the Hugging Face Hub ({why_not_loaded(err)}); "
            "download it where the hub "
            f"is reachable, save it as .json/.jsonl and set data.path to that file"
        ) from None
    return [dict(r) for r in ds]


def read_records(data_path: str, split: str) -> list:
    """The records of data.path: a local file, else a hub dataset's ``split``."""
    path = Path(data_path).expanduser()
    if path.is_file():
        return read_local_records(path)
    return read_hub_records(data_path, split)
