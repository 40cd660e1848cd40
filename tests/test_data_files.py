"""Data files people really have: JSON with a UTF-8 BOM, Parquet and CSV prepare exactly as their JSON twin; a
folder, an unknown extension or a damaged file is one line; exact duplicates across the split are warned about,
counted, and dropped with data.dedupe."""

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_config

from loralab import cli
from loralab.files import file_sha256
from loralab.sources import looks_local

FIELDS = ("instruction", "input", "output")
# Text a CSV reader must not guess at: numbers, "NA"/"None", a leading zero, quotes, commas and line breaks.
AWKWARD = [
    {"instruction": "What is 6 times 7?", "output": "42"},
    {"instruction": "Write the empty value of pandas.", "input": "NA", "output": "None"},
    {"instruction": "Pad the number 7 to three digits.", "output": "007"},
    {"instruction": 'Quote "this", then list: a, b', "input": "line one\nline two", "output": "1e5, \"done\"\n"},
]


def _twin_records(alpaca_records) -> list[dict]:
    """Alpaca records with the optional input left out where it is empty (a CSV has an empty cell there)."""
    records = [{k: v for k, v in r.items() if k != "input" or v} for r in alpaca_records[:40]]
    return records + AWKWARD


def _write_json(path: Path, records: list[dict]) -> None:
    path.write_text(json.dumps(records), encoding="utf-8")


def _write_bom_json(path: Path, records: list[dict]) -> None:
    path.write_text(json.dumps(records), encoding="utf-8-sig")  # what Windows editors save


def _write_bom_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8-sig")


def _write_parquet(path: Path, records: list[dict]) -> None:
    schema = pa.schema([(name, pa.string()) for name in FIELDS])  # from_pylist alone takes the first row's
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)  # a missing input is a null


def _csv_writer(encoding: str):
    def write(path: Path, records: list[dict]) -> None:
        with open(path, "w", newline="", encoding=encoding) as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")  # a missing input is an empty cell
            writer.writeheader()
            writer.writerows(records)
    return write


def _prepare(folder: Path, data: Path, model: Path, *extra: str) -> int:
    cfg = write_config(folder / "c.yaml", model={"name_or_path": str(model)},
                       data={"path": str(data), "num_examples": None, "eval_size": 8})
    return cli.main(["prepare", str(cfg), *extra])


def _split(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / "data" / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def json_twin(tmp_path_factory, tiny_model_dir, alpaca_records) -> Path:
    """The run directory of the records prepared from a plain JSON file."""
    folder = tmp_path_factory.mktemp("json-twin")
    _write_json(folder / "d.json", _twin_records(alpaca_records))
    assert _prepare(folder, folder / "d.json", tiny_model_dir) == 0
    return folder / "runs" / "t"


@pytest.mark.parametrize("name, write", [
    ("d.json", _write_bom_json),
    ("d.jsonl", _write_bom_jsonl),
    ("d.parquet", _write_parquet),
    ("d.csv", _csv_writer("utf-8")),
    ("d.CSV", _csv_writer("utf-8-sig")),  # Excel's "CSV UTF-8": a BOM, and the extension in capitals
])
def test_files_prepare_to_the_same_token_ids_as_their_json_twin(capsys, tmp_path, tiny_model_dir, alpaca_records,
                                                                 json_twin, name, write):
    data = tmp_path / name
    write(data, _twin_records(alpaca_records))
    assert _prepare(tmp_path, data, tiny_model_dir) == 0, capsys.readouterr().err
    assert capsys.readouterr().err == ""  # no progress bars or log lines from the readers
    run = tmp_path / "runs" / "t"
    for split in ("train", "eval"):
        assert _split(run, split) == _split(json_twin, split)  # ids, labels and the normalised records
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert stats["format"] == "alpaca" and stats["source_records"] == len(_twin_records(alpaca_records))
    # The stage's fingerprint is the file's sha256, whatever its format.
    assert json.loads((run / "manifest.json").read_text())["data_sha256"] == file_sha256(data)


def test_data_file_names_are_local_paths():
    for name in ("train.parquet", "train.csv", "data/train.PARQUET", "d.jsonl"):
        assert looks_local(name), name
    assert not looks_local("tatsu-lab/alpaca")


def _fails_in_one_line(capsys, tmp_path, data: Path, model: Path, *fragments: str) -> None:
    assert _prepare(tmp_path, data, model) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("loralab: error:"), err
    assert all(f in err for f in fragments), err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_an_empty_folder_as_data_path_asks_for_a_file(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "data").mkdir()
    _fails_in_one_line(capsys, tmp_path, tmp_path / "data", tiny_model_dir, "is a folder; set it to a data file",
                       ".json, .jsonl, .parquet or .csv")


def test_a_folder_of_data_files_names_one_to_use(capsys, tmp_path, tiny_model_dir, alpaca_records):
    (tmp_path / "data").mkdir()
    _write_parquet(tmp_path / "data" / "train.parquet", alpaca_records[:20])
    _fails_in_one_line(capsys, tmp_path, tmp_path / "data", tiny_model_dir, "is a folder; set it to one data file",
                       str(tmp_path / "data" / "train.parquet"))


@pytest.mark.parametrize("name, content, fragments", [
    ("d.txt", "[]", ("loralab reads .json, .jsonl, .parquet or .csv files, not '.txt'",)),
    ("d.parquet", '[{"instruction": "a", "output": "b"}]', ("cannot read data file", "as Parquet")),
    ("d.csv", "instruction,output\na,b,c,d\n", ("row 1 has 4 cells but the header names 2 columns",)),
    ("d.json", "[]".encode("utf-16"), ("is not UTF-8 text", "save it as UTF-8")),
])
def test_a_file_that_cannot_be_read_fails_in_one_line(capsys, tmp_path, tiny_model_dir, name, content, fragments):
    data = tmp_path / name
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    _fails_in_one_line(capsys, tmp_path, data, tiny_model_dir, *fragments)


def test_a_missing_csv_is_not_looked_up_on_the_hub(capsys, tmp_path, tiny_model_dir):
    _fails_in_one_line(capsys, tmp_path, Path("nope.csv"), tiny_model_dir, "data file not found: nope.csv")


# Exact duplicates ---------------------------------------------------------------------------------------------

def _keys(records: list[dict]) -> list[str]:
    return [json.dumps(r["record"], sort_keys=True) for r in records]


def test_duplicates_across_the_split_are_warned_counted_and_dropped_with_dedupe(capsys, tmp_path, tiny_model_dir,
                                                                                alpaca_records):
    distinct = alpaca_records[:10]
    # Each record three times; a third of the copies lose their empty input (the same record once normalised).
    records = [dict(r) for r in distinct for _ in range(3)]
    for r in records[::3]:
        if not r["input"]:
            del r["input"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": str(data), "num_examples": None, "eval_size": 3})
    run = tmp_path / "runs" / "t"

    assert cli.main(["prepare", str(cfg)]) == 0
    stats = json.loads((run / "data" / "stats.json").read_text())
    train, held_out = _keys(_split(run, "train")), _keys(_split(run, "eval"))
    copies = sum(k in train for k in held_out)
    assert copies > 0
    assert (stats["duplicates_within_data"], stats["duplicates_dropped"], stats["duplicates_across_split"]) == (
        20, 0, copies)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "exact duplicates" in line]
    assert warnings == [f"prepare: warning: {copies} of the 3 held-out records are exact duplicates of training "
                        f"records in {data}, so held-out metrics measure memorisation; set data.dedupe: true to drop "
                        f"duplicate records before the split"]

    assert cli.main(["prepare", str(cfg), "--set", "data.dedupe=true"]) == 0
    out = capsys.readouterr().out
    assert "exact duplicates" not in out and "20 duplicate records dropped (data.dedupe)" in out
    stats = json.loads((run / "data" / "stats.json").read_text())
    train, held_out = _keys(_split(run, "train")), _keys(_split(run, "eval"))
    assert (len(train), len(held_out)) == (7, 3) and len(set(train + held_out)) == 10
    assert not set(train) & set(held_out)
    assert (stats["duplicates_within_data"], stats["duplicates_dropped"], stats["duplicates_across_split"]) == (
        20, 20, 0)
    assert stats["source_records"] == 30 and stats["selected"] == 10
