"""What each stage's outputs depend on beyond the config: content fingerprints of the data file, the tokenizer
and the model files, and the one table of stage hashes (prepare -> train -> eval) built from them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

from loralab.config import ExperimentConfig
from loralab.data import DataError
from loralab.files import file_sha256
from loralab.runs.layout import RunDir
from loralab.runs.protocol import StageKey, StageRecords, stage_hash, stage_inputs
from loralab.sources import looks_local, no_data_file

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt", "*.jinja")
WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin")


def source_fingerprint(cfg: ExperimentConfig) -> str:
    """sha256 of a local data file, or the hub id and split (a hub dataset is not downloaded to check it)."""
    path = Path(cfg.data.path).expanduser()
    if path.is_file():
        try:
            return file_sha256(path)
        except OSError as err:
            raise DataError(f"cannot read data file {path} ({err.strerror or err}); check its permissions") from None
    if path.exists() or looks_local(cfg.data.path):
        raise no_data_file(path)
    return f"hub:{cfg.data.path}:{cfg.data.split}"


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


def model_fingerprint(name_or_path: str) -> str:
    """A string that changes when the model behind ``name_or_path`` changes.

    For a local directory: a digest of config.json plus the name, size and mtime of each weight file
    (cheap: weights are not read). For a hub id: the id and, when it is in the local HF cache, the
    snapshot commit it resolves to.
    """
    path = Path(name_or_path)
    if path.is_file():  # a GGUF file: its size and mtime (hashing it would cost seconds on every eval)
        return f"file:{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
    if path.is_dir():
        config_file = path / "config.json"
        weights = sorted({file for pattern in WEIGHT_FILE_PATTERNS for file in path.glob(pattern)})
        parts = {
            "config": config_file.read_text(encoding="utf-8") if config_file.exists() else None,
            "weights": [[file.name, file.stat().st_size, file.stat().st_mtime_ns] for file in weights],
        }
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()
        return f"local:{digest}"
    commit = cached_snapshot_commit(name_or_path)
    return f"hub:{name_or_path}@{commit}" if commit else f"hub:{name_or_path}"


def cached_snapshot_commit(repo_id: str) -> str | None:
    """The commit of the locally cached snapshot that ``repo_id``'s config.json resolves to, if any."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id (e.g. a path that does not exist)
        return None
    # A real hit is a str path .../snapshots/<commit>/config.json; misses are None or a sentinel object.
    if not isinstance(cached, str):
        return None
    return Path(cached).parent.name


def prepare_fingerprints(cfg: ExperimentConfig) -> dict[str, str]:
    """Content fingerprints of prepare's inputs beyond the config: the data file and the tokenizer files."""
    return {"data file (sha256)": source_fingerprint(cfg), "tokenizer files": tokenizer_fingerprint(cfg)}


def train_fingerprints(cfg: ExperimentConfig) -> dict[str, str]:
    """Content fingerprints of train's inputs beyond the config: prepare's, and the model files (config.json,
    each weight file's size and mtime), so a model replaced in place is noticed."""
    return {**prepare_fingerprints(cfg), "model files": model_fingerprint(cfg.model.name_or_path)}


class StageKeys(NamedTuple):
    """The expected key of each stage for one config, each chaining the one before it."""

    prepare: StageKey
    train: StageKey
    eval: StageKey


def stage_keys(cfg: ExperimentConfig, prints: dict[str, str] | None = None) -> StageKeys:
    """Every stage's hash and inputs for ``cfg``: prepare from the data and tokenizer fingerprints, train from
    prepare's hash and the model files, eval from train's. ``prints``: train_fingerprints(cfg), computed when not
    given (a hub dataset or model is not downloaded to fingerprint it)."""
    prints = prints or train_fingerprints(cfg)
    model_print = {"model files": prints["model files"]}
    prepare_prints = {k: v for k, v in prints.items() if k not in model_print}
    prepare = StageKey("prepare", stage_hash(cfg, "prepare", None, prepare_prints),
                       stage_inputs(cfg, "prepare", prepare_prints))
    train = StageKey("train", stage_hash(cfg, "train", prepare.hash, model_print), stage_inputs(cfg, "train", prints))
    evals = StageKey("eval", stage_hash(cfg, "eval", train.hash), stage_inputs(cfg, "eval", prints))
    return StageKeys(prepare, train, evals)


def prepare_key(cfg: ExperimentConfig) -> StageKey:
    """prepare's key alone: its fingerprints only (the model's weight files are not looked at)."""
    prints = prepare_fingerprints(cfg)
    return StageKey("prepare", stage_hash(cfg, "prepare", None, prints), stage_inputs(cfg, "prepare", prints))


def report_key(cfg: ExperimentConfig, eval_hash: str | None) -> StageKey:
    """report's key: it is rebuilt every time from whatever eval last wrote, so it chains the recorded eval hash."""
    return StageKey("report", stage_hash(cfg, "report", eval_hash), {})


def evaluated(cfg: ExperimentConfig) -> bool:
    """Whether the run directory of ``cfg`` holds an eval of this very config (not files an earlier run with other
    settings left there): what a sweep counts as a finished run."""
    return StageRecords(RunDir(cfg)).is_current("eval", stage_keys(cfg).eval.hash)
