"""Where a run's data comes from: the one rule that tells a local path from a hub id, and reading the records of
a local file (JSON, JSON lines, Parquet, CSV) or a hub dataset."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from loralab.data import DataError
from loralab.errors import first_sentence
from loralab.files import JsonlError, parse_jsonl
from loralab.hub import prepare_hub_access, why_not_loaded

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
"""The local data files loralab reads, by extension (any case)."""
SUPPORTED = ", ".join(DATA_SUFFIXES[:-1]) + " or " + DATA_SUFFIXES[-1]


def looks_local(name: str) -> bool:
    """Whether data.path or model.name_or_path names a local file or folder rather than a hub id ("owner/name"):
    a path that starts with . / ~, has more than one /, uses this OS's separator, or ends in .json, .jsonl,
    .parquet, .csv or .gguf. One that does not exist is then an error, not a hub lookup."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
            or name.lower().endswith((*DATA_SUFFIXES, ".gguf")))


def no_data_file(path: Path) -> DataError:
    """The one-line error for a data.path that is not a data file: a folder (naming a data file inside when it
    holds one) or nothing at all."""
    if not path.is_dir():
        return DataError(f"data file not found: {path}; set data.path to a data file ({SUPPORTED}) "
                         f"or a hub dataset id")
    with contextlib.suppress(OSError):
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES and p.is_file())
        if inside:
            return DataError(f"data.path {path} is a folder; set it to one data file, e.g. {path / inside[0]}")
    return DataError(f"data.path {path} is a folder; set it to a data file ({SUPPORTED})")


def read_local_records(path: Path) -> list:
    """The records of a local data file, read by its extension (DATA_SUFFIXES); DataError naming the file."""
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(f"cannot read data file {path}: loralab reads {SUPPORTED} files, not "
                        f"'{path.suffix or 'no extension'}'; save the data in one of these")
    if suffix in (".parquet", ".csv"):
        return _read_table(path, suffix[1:])
    try:
        text = path.read_text(encoding="utf-8-sig")  # utf-8-sig: a BOM (Windows editors write one) is skipped
    except (OSError, UnicodeDecodeError) as err:
        raise _unreadable(path, err) from None
    try:
        return _parse_records(path, text)
    except RecursionError:
        raise DataError(f"{path} nests JSON too deeply to be Alpaca records; each record is a flat object "
                        f"with 'instruction', 'input' and 'output'") from None


def _parse_records(path: Path, text: str) -> list:
    if path.suffix.lower() == ".jsonl":
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


@contextlib.contextmanager
def _quiet(datasets) -> Iterator[None]:
    """No progress bars or log lines from ``datasets`` while it reads a local file: loralab's errors are one line."""
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _read_table(path: Path, kind: str) -> list[dict]:
    """The rows of a Parquet or CSV file as records, read with ``datasets`` (its cache in a temporary folder).

    Every CSV cell is read as the text it is (an empty cell is ""; no number or "NA" guessing), so a CSV reads
    as the JSON with the same strings would."""
    import datasets  # imported here: a heavy import the JSON path and the other commands do not need

    name = {"csv": "CSV", "parquet": "Parquet"}[kind]
    try:
        options = _csv_options(path) if kind == "csv" else {}
        with tempfile.TemporaryDirectory(prefix="loralab-data-", ignore_cleanup_errors=True) as cache, _quiet(datasets):
            rows = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache, **options)
            return [dict(r) for r in rows]
    except DataError:
        raise
    except (OSError, UnicodeDecodeError) as err:
        raise _unreadable(path, err) from None
    except Exception as err:  # pyarrow and pandas raise many types for a damaged file
        while err.__cause__ or err.__context__:  # datasets wraps the reader's error: name the reader's
            err = err.__cause__ or err.__context__
        raise DataError(f"cannot read data file {path} as {name} ({first_sentence(err)}); check that it is a "
                        f"{name} file") from None


def _unreadable(path: Path, err: OSError | UnicodeDecodeError) -> DataError:
    """The one line for a data file that cannot be read: missing, not UTF-8, or refused by the system."""
    if isinstance(err, FileNotFoundError):
        return no_data_file(path)
    if isinstance(err, UnicodeDecodeError):
        return DataError(f"data file {path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8")
    return DataError(f"cannot read data file {path} ({err.strerror or err}); check its permissions")


def _csv_options(path: Path) -> dict:
    """How ``datasets`` (pandas) reads a CSV file: every cell as its text, after checking that each row has as
    many cells as the header (pandas would otherwise shift a longer row's cells into an index)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for n, row in enumerate(reader, 1):
            if row and len(row) != len(header):
                raise DataError(f"{path} row {n} has {len(row)} cells but the header names {len(header)} columns; "
                                f"fix that row (quote cells that hold commas)")
    return {"encoding": "utf-8-sig", "converters": dict.fromkeys(header, str), "keep_default_na": False,
            "na_filter": False}


def read_hub_records(dataset_id: str, split: str) -> list:
    prepare_hub_access()
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # datasets raises many types (connection, offline mode, missing id)
        raise DataError(
            f"cannot load dataset '{dataset_id}' from the Hugging Face Hub ({why_not_loaded(err)}); "
            "download it where the hub "
            f"is reachable, save it as a {SUPPORTED} file and set data.path to that file"
        ) from None
    return [dict(r) for r in ds]


def read_records(data_path: str, split: str) -> list:
    """The records of data.path: a local file, else a hub dataset's ``split``."""
    path = Path(data_path).expanduser()
    if path.is_file():
        return read_local_records(path)
    if path.exists() or looks_local(data_path):
        raise no_data_file(path)
    return read_hub_records(data_path, split)
