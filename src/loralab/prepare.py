"""The prepare stage: records (Alpaca, chat, ShareGPT, prompt/completion, text) -> tokenised, masked train/eval splits."""

from __future__ import annotations

import json
import time
from pathlib import Path

from loralab.config import ExperimentConfig
from loralab.data import DataError, encode_split, make_template, read_format, select_and_split
from loralab.modeling import load_tokenizer
from loralab.rundir import RunDir, file_sha256, stage_hash, write_json, write_jsonl


def _looks_local(path: str) -> bool:
    return path.endswith((".json", ".jsonl")) or path.startswith((".", "/", "~"))


def read_local_records(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}; set data.path to a .json/.jsonl file or a hub dataset id") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read data file {path}: {err}") from None
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
        return file_sha256(path)
    if path.exists() or _looks_local(cfg.data.path):
        raise DataError(f"data file not found: {path}; set data.path to a .json/.jsonl file or a hub dataset id")
    return f"hub:{cfg.data.path}:{cfg.data.split}"


def read_records(cfg: ExperimentConfig) -> list:
    path = Path(cfg.data.path).expanduser()
    if path.is_file():
        return read_local_records(path)
    return read_hub_records(cfg.data.path, cfg.data.split)


def current_hash(cfg: ExperimentConfig) -> str:
    """The hash of what prepare's outputs depend on: data config, tokenizer source, data file."""
    return stage_hash(cfg, "prepare", None, {"source": source_fingerprint(cfg)})


def run(cfg: ExperimentConfig, force: bool = False) -> str:
    """Write data/train.jsonl, data/eval.jsonl and data/stats.json; return the stage hash."""
    rundir = RunDir(cfg)
    fingerprint = source_fingerprint(cfg)
    expected = current_hash(cfg)
    if not force and rundir.is_current("prepare", expected):
        print(f"prepare: up to date ({rundir.data_dir})")
        return expected

    start = time.perf_counter()
    where = cfg.data.path
    data_format, records = read_format(read_records(cfg), cfg.data.format, cfg.data.columns, where)
    if not records:
        raise DataError(f"{where} holds no records")
    train_idx, eval_idx = select_and_split(len(records), cfg.data.num_examples, cfg.data.eval_size, cfg.data.seed)
    tokenizer = load_tokenizer(cfg.model)
    template = make_template(tokenizer, cfg.data.template, data_format)
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
        "source_records": len(records),
        "selected": len(train_idx) + len(eval_idx),
        "format": data_format,
        "template": template.kind,
        "train": train_stats,
        "eval": eval_stats,
        "truncated": train_stats["truncated"] + eval_stats["truncated"],
        "dropped": train_stats["dropped"] + eval_stats["dropped"],
        "trained_token_fraction": (train_stats["trained_tokens"] + eval_stats["trained_tokens"]) / max(total_tokens, 1),
    }
    rundir.root.mkdir(parents=True, exist_ok=True)
    write_jsonl(rundir.train_file, train)
    write_jsonl(rundir.eval_file, evals)
    write_json(rundir.stats_file, stats)
    rundir.update_manifest(data_sha256=fingerprint, data_format=data_format, seeds={"data": cfg.data.seed, "train": cfg.train.seed})
    rundir.mark_done("prepare", expected, time.perf_counter() - start)
    print(
        f"prepare: {len(train)} train / {len(evals)} eval examples ({data_format}), {stats['truncated']} truncated, "
        f"{stats['dropped']} dropped, {100 * stats['trained_token_fraction']:.1f}% of tokens trained -> {rundir.data_dir}"
    )
    return expected
