"""The run directory ``<output_dir>/<name>/``: its layout, atomic writes, the manifest and stage hashes.

Each stage records a hash of everything it depends on (its config sections, the data file, and the
hash of the stage before it). A stage whose hash is unchanged and whose outputs exist is skipped; a
stage that reads an earlier stage's outputs refuses them when they were made from another config.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from loralab.config import ExperimentConfig, dump_config
from loralab.errors import LoralabError

STAGES = ("prepare", "train", "eval", "report")

# Config sections (and top-level keys) each stage's outputs depend on, besides the stage before it.
STAGE_INPUTS = {
    "prepare": ("model.name_or_path", "model.revision", "data"),
    "train": ("model", "lora", "train"),
    "eval": ("eval",),
    "report": (),
}


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


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _lookup(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_hash(cfg: ExperimentConfig, stage: str, upstream_hash: str | None, extra: dict | None = None) -> str:
    """Hash of what ``stage``'s outputs depend on."""
    as_dict = cfg.to_dict()
    payload = {
        "stage": stage,
        "inputs": {key: _lookup(as_dict, key) for key in STAGE_INPUTS[stage]},
        "upstream": upstream_hash,
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunDir:
    """Owns the layout of one experiment's run directory."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.root = cfg.run_dir

    # Layout -------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def train_file(self) -> Path:
        return self.data_dir / "train.jsonl"

    @property
    def eval_file(self) -> Path:
        return self.data_dir / "eval.jsonl"

    @property
    def stats_file(self) -> Path:
        return self.data_dir / "stats.json"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def manifest_file(self) -> Path:
        return self.root / "manifest.json"

    @property
    def eval_results_file(self) -> Path:
        return self.root / "eval_results.csv"

    @property
    def predictions_file(self) -> Path:
        return self.root / "predictions.jsonl"

    @property
    def examples_file(self) -> Path:
        return self.root / "examples.md"

    @property
    def report_file(self) -> Path:
        return self.root / "report.md"

    @property
    def cache_dir(self) -> Path:
        """Shared by every experiment under the same output_dir (base-model generations)."""
        return Path(self.cfg.output_dir) / ".cache"

    STAGE_OUTPUTS = {
        "prepare": ("data/train.jsonl", "data/eval.jsonl", "data/stats.json"),
        "train": ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl"),
        "eval": ("eval_results.csv", "predictions.jsonl", "examples.md"),
        "report": ("report.md", "loss_curve.png", "lora_flow.png"),
    }

    # Manifest ------------------------------------------------------------------------------------
    def manifest(self) -> dict:
        if not self.manifest_file.exists():
            return {}
        try:
            return json.loads(self.manifest_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise LoralabError(f"cannot read {self.manifest_file} ({err}); delete it to start this run afresh") from None

    def update_manifest(self, **fields: Any) -> dict:
        manifest = self.manifest()
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(manifest.get(key), dict):
                manifest[key].update(value)
            else:
                manifest[key] = value
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.manifest_file, manifest)
        return manifest

    def write_config(self) -> None:
        atomic_write_text(self.root / "config.yaml", dump_config(self.cfg))

    # Stages --------------------------------------------------------------------------------------
    def recorded_hash(self, stage: str) -> str | None:
        return self.manifest().get("stages", {}).get(stage, {}).get("hash")

    def outputs_exist(self, stage: str) -> bool:
        return all((self.root / rel).exists() for rel in self.STAGE_OUTPUTS[stage])

    def is_current(self, stage: str, expected_hash: str) -> bool:
        return self.recorded_hash(stage) == expected_hash and self.outputs_exist(stage)

    def require_current(self, stage: str, expected_hash: str, for_stage: str) -> None:
        """Refuse to build on ``stage``'s outputs unless they were made from this config."""
        if not self.outputs_exist(stage):
            raise LoralabError(
                f"{for_stage} needs the outputs of '{stage}' in {self.root}; run `loralab {stage} CONFIG` (or `loralab run CONFIG`) first"
            )
        if self.recorded_hash(stage) != expected_hash:
            raise LoralabError(
                f"the '{stage}' outputs in {self.root} were made from a different config; "
                f"run `loralab {stage} CONFIG` again (or `loralab run CONFIG`) before {for_stage}"
            )

    def mark_done(self, stage: str, stage_hash_: str, wall_s: float, **extra: Any) -> None:
        # Later stages need no invalidation here: their expected hash chains this one's, so it changes too.
        self.write_config()  # the resolved config of the newest stage (overrides included)
        stages = self.manifest().get("stages", {})
        stages[stage] = {
            "hash": stage_hash_,
            "wall_s": round(wall_s, 3),
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        self.update_manifest(stages=stages)


def environment_info() -> dict[str, Any]:
    """Versions and source state to reproduce a run: loralab, key packages, Python, git commit."""
    import platform
    import subprocess
    from importlib import metadata

    import loralab

    packages = {}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "sacrebleu", "rouge-score"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    try:
        import torch

        packages["torch"] = torch.__version__  # includes the build (+cpu, +cu121)
    except ImportError:
        pass
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(loralab.__file__).parent, capture_output=True, text=True, timeout=5
        )
        commit = proc.stdout.strip() if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"loralab_version": loralab.__version__, "python": platform.python_version(), "packages": packages, "git_commit": commit}


def check_output_dir(dest: Path, overwrite: bool, what: str) -> None:
    """Refuse to write ``what`` into ``dest`` when it holds something, unless ``overwrite``."""
    if dest.exists() and not dest.is_dir():
        raise LoralabError(f"{dest} is a file; give --out a folder for the {what}")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise LoralabError(f"{dest} already holds files; pass --overwrite to replace them, or choose another --out")


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    """Fail before writing when the disk under ``folder`` has less than ``need_bytes`` free."""
    import shutil

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
    import shutil

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
