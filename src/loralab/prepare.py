"""The prepare stage: records (Alpaca, chat, ShareGPT, prompt/completion, text) -> tokenised, masked train/eval splits."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from loralab.config import ExperimentConfig
from loralab.data import (
    DataError,
    answer_text,
    encode_split,
    escape_special_tokens,
    make_template,
    read_format,
    select_and_split,
    split_sizes,
)
from loralab.modeling import load_tokenizer
from loralab.rundir import (
    RunDir,
    file_sha256,
    stage_hash,
    stage_inputs,
    write_json,
    write_jsonl,
)

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt", "*.jinja")


def _looks_local(path: str) -> bool:
    return path.endswith((".json", ".jsonl")) or path.startswith((".", "/", "~"))


def read_local_records(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}; set data.path to a .json/.jsonl file or a hub dataset id") from None
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
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {n}: not valid JSON ({err.msg})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of records")
    return records


def read_hub_records(dataset_id: str, split: str) -> list:
    from loralab.hub import prepare_hub_access, why_not_loaded

    prepare_hub_access()
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # datasets raises many types (connection, offline mode, missing id)
        raise DataError(
            f"cannot load dataset '{dataset_id}' from the Hugging Face Hub ({why_not_loaded(err)}); download it where the hub "
            f"is reachable, save it as .json/.jsonl and set data.path to that file"
        ) from None
    return [dict(r) for r in ds]


def source_fingerprint(cfg: ExperimentConfig) -> str:
    """sha256 of a local data file, or the hub id and split (a hub dataset is not downloaded to check it)."""
    path = Path(cfg.data.path).expanduser()
    if path.is_file():
        try:
            return file_sha256(path)
        except OSError as err:
            raise DataError(f"cannot read data file {path} ({err.strerror or err}); check its permissions") from None
    if path.exists() or _looks_local(cfg.data.path):
        raise DataError(f"data file not found: {path}; set data.path to a .json/.jsonl file or a hub dataset id")
    return f"hub:{cfg.data.path}:{cfg.data.split}"


def read_records(cfg: ExperimentConfig) -> list:
    path = Path(cfg.data.path).expanduser()
    if path.is_file():
        return read_local_records(path)
    return read_hub_records(cfg.data.path, cfg.data.split)


def tokenizer_fingerprint(cfg: ExperimentConfig) -> str:
    """sha256 over a local model folder's tokenizer files (so one replaced in place is noticed), or the hub id."""
    path = Path(cfg.model.name_or_path).expanduser()
    if not path.is_dir():
        return f"hub:{cfg.model.name_or_path}@{cfg.model.revision}"
    digest = hashlib.sha256()
    for file in sorted({f for pattern in TOKENIZER_FILES for f in path.glob(pattern) if f.is_file()}):
        try:
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
        except OSError as err:
            raise DataError(f"cannot read {file} ({err.strerror or err}); "
                            f"check the model folder's permissions") from None
    return digest.hexdigest()[:16]


def fingerprints(cfg: ExperimentConfig) -> dict[str, str]:
    """Content fingerprints of prepare's inputs beyond the config: the data file and the tokenizer files."""
    return {"data file (sha256)": source_fingerprint(cfg), "tokenizer files": tokenizer_fingerprint(cfg)}


def current_hash(cfg: ExperimentConfig, prints: dict[str, str] | None = None) -> str:
    """The hash of what prepare's outputs depend on: data config, tokenizer source and files, data file."""
    return stage_hash(cfg, "prepare", None, prints or fingerprints(cfg))


def usable_records(cfg: ExperimentConfig, specials: list[str]) -> tuple[str, list[dict], dict]:
    """(format, the source's records normalised, counts): records whose answer is empty dropped, special-token
    strings escaped (data.escape_special_tokens), both counted for stats.json."""
    where = cfg.data.path
    data_format, records = read_format(read_records(cfg), cfg.data.format, cfg.data.columns, where)
    if not records:
        raise DataError(f"{where} holds no records")
    kept = [r for r in records if answer_text(r).strip()]
    if not kept:
        raise DataError(f"every one of the {len(records)} records of {where} has an empty answer: there is nothing "
                        f"to train on; fill in the answers")
    escaped = [escape_special_tokens(r, specials) for r in kept]
    counts = {"source_records": len(records), "empty_outputs": len(records) - len(kept),
              "escaped_special_tokens": sum(n for _, n in escaped)}
    return data_format, [r for r, _ in escaped], counts


def run(cfg: ExperimentConfig, force: bool = False) -> str:
    """Write data/train.jsonl, data/eval.jsonl and data/stats.json; return the stage hash."""
    rundir = RunDir(cfg)
    prints = fingerprints(cfg)
    expected = current_hash(cfg, prints)
    if not force and rundir.is_current("prepare", expected):
        print(f"prepare: up to date ({rundir.data_dir})")
        return expected

    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    data_format, records, counts = usable_records(cfg, list(tokenizer.all_special_tokens))
    template = make_template(tokenizer, cfg.data.template, data_format)
    for warning in split_sizes(len(records), cfg.data.num_examples, cfg.data.eval_size, cfg.data.path):
        print(f"prepare: warning: {warning}")
    train_idx, eval_idx = select_and_split(len(records), cfg.data.num_examples, cfg.data.eval_size, cfg.data.seed)
    turns = cfg.data.assistant_turns
    train, train_stats = encode_split(tokenizer, template, [records[i] for i in train_idx], cfg.data.max_length, turns)
    evals, eval_stats = encode_split(tokenizer, template, [records[i] for i in eval_idx], cfg.data.max_length, turns)
    if not train:
        raise DataError(
            f"no training examples left after filtering {len(train_idx)} records (truncated: {train_stats['truncated']}, "
            f"dropped with no trained token: {train_stats['dropped']}); raise data.max_length or check the data"
        )
    total_tokens = train_stats["tokens"] + eval_stats["tokens"]
    stats = {
        **counts,
        "selected": len(train_idx) + len(eval_idx),
        "format": data_format,
        "template": template.kind,
        "train": train_stats,
        "eval": eval_stats,
        "truncated": train_stats["truncated"] + eval_stats["truncated"],
        "dropped": train_stats["dropped"] + eval_stats["dropped"],
        "trained_token_fraction": (train_stats["trained_tokens"] + eval_stats["trained_tokens"]) / max(total_tokens, 1),
    }
    with rundir.attempt("prepare", expected):
        write_jsonl(rundir.train_file, train)
        write_jsonl(rundir.eval_file, evals)
        write_json(rundir.stats_file, stats)
        rundir.update_manifest(data_sha256=prints["data file (sha256)"], data_format=data_format,
                               seeds={"data": cfg.data.seed, "train": cfg.train.seed})
        rundir.mark_done("prepare", expected, time.perf_counter() - start, inputs=stage_inputs(cfg, "prepare", prints))
    notes = [f"{counts[k]} {what}" for k, what in (("empty_outputs", "records with an empty answer dropped"),
             ("escaped_special_tokens", "special-token strings in the text escaped to train as text")) if counts[k]]
    print(
        f"prepare: {len(train)} train / {len(evals)} eval examples ({data_format}), {stats['truncated']} truncated, "
        f"{stats['dropped']} dropped, {100 * stats['trained_token_fraction']:.1f}% of tokens trained"
        + "".join(f", {n}" for n in notes) + f" -> {rundir.data_dir}"
    )
    return expected
