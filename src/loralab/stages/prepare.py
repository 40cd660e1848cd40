"""The prepare stage: records (Alpaca, chat, ShareGPT, prompt/completion, text) -> tokenised, masked
train/eval splits."""

from __future__ import annotations

import time

from loralab.config import ExperimentConfig
from loralab.data import (
    DataError,
    answer_text,
    dedupe,
    encode_split,
    escape_special_tokens,
    make_template,
    read_format,
    record_key,
    select_and_split,
    split_sizes,
)
from loralab.errors import hide_library_deprecations
from loralab.files import write_json, write_jsonl
from loralab.models.loading import load_tokenizer
from loralab.runs.fingerprints import prepare_key
from loralab.runs.layout import RunDir
from loralab.runs.protocol import Stage
from loralab.sources import read_records


def usable_records(cfg: ExperimentConfig, specials: list[str]) -> tuple[str, list[dict], dict]:
    """(format, the source's records normalised, counts): records whose answer is empty dropped, exact duplicates
    dropped when data.dedupe is set, special-token strings escaped (data.escape_special_tokens), all counted for
    stats.json."""
    where = cfg.data.path
    data_format, records = read_format(read_records(cfg.data.path, cfg.data.split), cfg.data.format, cfg.data.columns,
                                       where)
    if not records:
        raise DataError(f"{where} holds no records")
    kept = [r for r in records if answer_text(r).strip()]
    if not kept:
        raise DataError(f"every one of the {len(records)} records of {where} has an empty answer: there is nothing "
                        f"to train on; fill in the answers")
    unique = dedupe(kept)
    escaped = [escape_special_tokens(r, specials) for r in (unique if cfg.data.dedupe else kept)]
    counts = {"source_records": len(records), "empty_outputs": len(records) - len(kept),
              "duplicates_within_data": len(kept) - len(unique),
              "duplicates_dropped": len(kept) - len(unique) if cfg.data.dedupe else 0,
              "escaped_special_tokens": sum(n for _, n in escaped)}
    return data_format, [r for r, _ in escaped], counts


def split_records(cfg: ExperimentConfig, records: list[dict]) -> tuple[list[dict], list[dict], int]:
    """(train, held-out) records as data.num_examples, eval_size and seed draw them, and how many held-out
    records are exact copies of a training record; the warnings printed."""
    for warning in split_sizes(len(records), cfg.data.num_examples, cfg.data.eval_size, cfg.data.path):
        print(f"prepare: warning: {warning}")
    train_idx, eval_idx = select_and_split(len(records), cfg.data.num_examples, cfg.data.eval_size, cfg.data.seed)
    train, held_out = [records[i] for i in train_idx], [records[i] for i in eval_idx]
    trained = {record_key(r) for r in train}
    copies = sum(record_key(r) in trained for r in held_out)
    if copies:
        print(f"prepare: warning: {copies} of the {len(held_out)} held-out records are exact duplicates of "
              f"training records in {cfg.data.path}, so held-out metrics measure memorisation; set data.dedupe: "
              f"true to drop duplicate records before the split")
    return train, held_out, copies


@hide_library_deprecations
def run(cfg: ExperimentConfig, force: bool = False) -> str:
    """Write data/train.jsonl, data/eval.jsonl and data/stats.json; return the stage hash."""
    rundir = RunDir(cfg)
    stage = Stage(rundir, prepare_key(cfg))
    if stage.up_to_date(force):
        print(f"prepare: up to date ({rundir.data_dir})")
        return stage.hash

    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    data_format, records, counts = usable_records(cfg, list(tokenizer.all_special_tokens))
    template = make_template(tokenizer, cfg.data.template, data_format)
    train_records, eval_records, copies = split_records(cfg, records)
    turns = cfg.data.assistant_turns
    train, train_stats = encode_split(tokenizer, template, train_records, cfg.data.max_length, turns)
    evals, eval_stats = encode_split(tokenizer, template, eval_records, cfg.data.max_length, turns)
    if not train:
        raise DataError(
            f"no training examples left after filtering {len(train_records)} records "
            f"(truncated: {train_stats['truncated']}, "
            f"dropped with no trained token: {train_stats['dropped']}); raise data.max_length or check the data"
        )
    total_tokens = train_stats["tokens"] + eval_stats["tokens"]
    stats = {
        **counts,
        "selected": len(train_records) + len(eval_records),
        "duplicates_across_split": copies,
        "format": data_format,
        "template": template.kind,
        "train": train_stats,
        "eval": eval_stats,
        "truncated": train_stats["truncated"] + eval_stats["truncated"],
        "dropped": train_stats["dropped"] + eval_stats["dropped"],
        "trained_token_fraction": (train_stats["trained_tokens"] + eval_stats["trained_tokens"]) / max(total_tokens, 1),
    }
    with stage.attempt():
        write_jsonl(rundir.train_file, train)
        write_jsonl(rundir.eval_file, evals)
        write_json(rundir.stats_file, stats)
        rundir.update_manifest(data_sha256=stage.key.inputs["data file (sha256)"], data_format=data_format,
                               seeds={"data": cfg.data.seed, "train": cfg.train.seed})
        stage.done(time.perf_counter() - start)
    notes = [f"{counts[k]} {what}" for k, what in (("empty_outputs", "records with an empty answer dropped"),
             ("duplicates_dropped", "duplicate records dropped (data.dedupe)"),
             ("escaped_special_tokens", "special-token strings in the text escaped to train as text")) if counts[k]]
    print(
        f"prepare: {len(train)} train / {len(evals)} eval examples ({data_format}), {stats['truncated']} truncated, "
        f"{stats['dropped']} dropped, {100 * stats['trained_token_fraction']:.1f}% of tokens trained"
        + "".join(f", {n}" for n in notes) + f" -> {rundir.data_dir}"
    )
    return stage.hash
