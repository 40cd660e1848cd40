"""Where a run's inputs come from and what they hash to: the one rule for local paths, reading the data source
(a local file or a hub dataset), and the fingerprints and hash chain prepare -> train -> eval that say whether a
stage's outputs are current. Stages ask here rather than each other."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from loralab.config import ExperimentConfig, ModelConfig
from loralab.data import DataError
from loralab.errors import LoralabError
from loralab.rundir import JsonlError, file_sha256, parse_jsonl, stage_hash

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt", "*.jinja")


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
    if path.exists() or looks_local(cfg.data.path):
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


def prepare_fingerprints(cfg: ExperimentConfig) -> dict[str, str]:
    """Content fingerprints of prepare's inputs beyond the config: the data file and the tokenizer files."""
    return {"data file (sha256)": source_fingerprint(cfg), "tokenizer files": tokenizer_fingerprint(cfg)}


def prepare_hash(cfg: ExperimentConfig, prints: dict[str, str] | None = None) -> str:
    """The hash of what prepare's outputs depend on: data config, tokenizer source and files, data file."""
    return stage_hash(cfg, "prepare", None, prints or prepare_fingerprints(cfg))


WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin")


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


def train_fingerprints(cfg: ExperimentConfig) -> dict[str, str]:
    """Content fingerprints of train's inputs beyond the config: prepare's, and the model files (config.json,
    each weight file's size and mtime), so a model replaced in place is noticed."""
    return {**prepare_fingerprints(cfg), "model files": model_fingerprint(cfg.model.name_or_path)}


def train_hash(cfg: ExperimentConfig, prints: dict[str, str] | None = None) -> str:
    """The hash of what train's outputs depend on: prepare's hash and the model files (``prints``: train_fingerprints)."""
    prints = prints or train_fingerprints(cfg)
    model_print = {"model files": prints["model files"]}
    upstream = prepare_hash(cfg, {k: v for k, v in prints.items() if k not in model_print})
    return stage_hash(cfg, "train", upstream, model_print)


def eval_hash(cfg: ExperimentConfig, prints: dict[str, str] | None = None) -> str:
    """The hash of what eval's outputs depend on: train's (``prints``: train_fingerprints)."""
    return stage_hash(cfg, "eval", train_hash(cfg, prints))


def read_model_config(model: ModelConfig) -> dict[str, Any]:
    """config.json of a local model folder, or the hub's through AutoConfig (no weights are read)."""
    from loralab.hub import why_not_loaded
    from loralab.modeling import resolve_model_source

    source = resolve_model_source(model)
    if Path(source).is_dir():
        return json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source, revision=model.revision).to_dict()
    except (OSError, ValueError) as err:
        raise LoralabError(
            f"cannot read the config of '{source}' from the Hugging Face Hub ({why_not_loaded(err)}); download the "
            f"model where the hub is reachable (`hf download {source} --local-dir DIR`) and set model.name_or_path: DIR"
        ) from None
