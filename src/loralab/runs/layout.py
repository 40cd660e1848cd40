"""The run directory ``<output_dir>/<name>/``: where each file lives, and the manifest that records the run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from loralab import __version__
from loralab.config import ExperimentConfig, dump_config
from loralab.errors import LoralabError
from loralab.files import atomic_write_text, completeness, folder_hashes, write_json
from loralab.launch import launched_processes

# The run directory's file names (RunDir's paths, the report and compare read them by these names).
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
STATS_FILE = "data/stats.json"
METRICS_FILE = "metrics.jsonl"
EVAL_RESULTS_FILE = "eval_results.csv"
PREDICTIONS_FILE = "predictions.jsonl"
EXAMPLES_FILE = "examples.md"
LOSS_CURVE_FILE = "loss_curve.png"
FLOW_FILE = "lora_flow.png"
REPORT_FILE = "report.md"
HTML_REPORT_FILE = "report.html"
DAMAGED_MANIFEST = MANIFEST_FILE + ".damaged"  # where a damaged manifest.json is moved, beside the rebuilt one
UNVERIFIED = "unverified"  # a stage record rebuilt from the run's files, not yet matched to a config
RETRAIN_DIR = ".retrain"  # a retrain beside a finished run, swapped in when it finishes (runs/recovery.py)


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
        return self.root / STATS_FILE

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def retrain_dir(self) -> Path:
        """Where a retrain over a finished run writes its own checkpoints/, metrics.jsonl, tensorboard/, adapter/
        and manifest, laid out as the run directory is, until it finishes and is swapped in."""
        return self.root / RETRAIN_DIR

    @property
    def manifest_file(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def eval_results_file(self) -> Path:
        return self.root / EVAL_RESULTS_FILE

    @property
    def predictions_file(self) -> Path:
        return self.root / PREDICTIONS_FILE

    @property
    def examples_file(self) -> Path:
        return self.root / EXAMPLES_FILE

    @property
    def cache_dir(self) -> Path:
        """Shared by every experiment under the same output_dir (base-model generations)."""
        return Path(self.cfg.output_dir) / ".cache"

    STAGE_OUTPUTS = {
        "prepare": ("data/train.jsonl", "data/eval.jsonl", "data/stats.json"),
        "train": ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", METRICS_FILE),
        "eval": (EVAL_RESULTS_FILE, PREDICTIONS_FILE, EXAMPLES_FILE),
        "report": (REPORT_FILE, LOSS_CURVE_FILE, FLOW_FILE),
    }

    # Manifest ------------------------------------------------------------------------------------
    def manifest(self) -> dict:
        """manifest.json ({} before the first stage); a damaged one is moved aside and rebuilt (rebuild_manifest)."""
        if not self.manifest_file.exists():
            return {}
        try:
            manifest = json.loads(self.manifest_file.read_text(encoding="utf-8"))
        except OSError as err:
            raise LoralabError(f"cannot read {self.manifest_file} ({err.strerror or err}); check the file's "
                               f"permissions") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            manifest = None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", {}), dict):
            return self.rebuild_manifest()
        return manifest

    def rebuild_manifest(self) -> dict:
        """Move a damaged manifest.json aside (DAMAGED_MANIFEST: nothing is deleted) and rebuild its stage records
        from the run's files: each stage whose outputs are all there is recorded UNVERIFIED with their sha256, and
        train with the hash and step its adapter's completion marker records when the adapter is whole. The stage
        protocol (runs.protocol) takes train as done once that hash is the config's, and with it prepare, whose
        hash train's chains; every stage it cannot match to the config is redone, never trusted."""
        if launched_processes()[0] != 0:  # under torchrun only the main process writes the run directory
            raise LoralabError(f"{self.manifest_file} is damaged; run a loralab command on {self.root} in one "
                               f"process first: it rebuilds the manifest from the run's files")
        aside = self.manifest_file.with_name(DAMAGED_MANIFEST)
        for n in range(2, 1000):  # an earlier damaged copy is kept too
            if not aside.exists():
                break
            aside = self.manifest_file.with_name(f"{DAMAGED_MANIFEST}-{n}")
        os.replace(self.manifest_file, aside)
        stages = {stage: {"status": UNVERIFIED, "outputs": folder_hashes(self.root, rels)}
                  for stage, rels in self.STAGE_OUTPUTS.items()
                  if stage != "report" and all((self.root / rel).is_file() for rel in rels)}
        adapter, _ = completeness(self.adapter_dir)
        if "train" in stages and adapter is not None:
            stages["train"].update(hash=adapter.get("train_hash"), steps=adapter.get("step"),
                                   upstream=outputs_digest(stages.get("prepare", {})))
        manifest = {"rebuilt_from": aside.name, "stages": stages}
        write_json(self.manifest_file, manifest)
        kept = "its adapter is whole and kept, " if "hash" in stages.get("train", {}) else ""
        print(f"note: {self.manifest_file} was damaged: moved it to {aside.name} and rebuilt it from the run's "
              f"files; {kept}a stage that cannot be matched to the config is redone by `loralab run CONFIG`")
        return manifest

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
        atomic_write_text(self.root / CONFIG_FILE, dump_config(self.cfg))


def outputs_digest(record: dict) -> str | None:
    """Names one attempt of a stage by what it wrote: the digest of its outputs' sha256."""
    outputs = record.get("outputs")
    return hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()[:16] if outputs else None


def environment_info() -> dict[str, Any]:
    """Versions and source state to reproduce a run: loralab, key packages, Python, git commit."""
    import platform
    import subprocess
    from importlib import metadata

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
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        commit = proc.stdout.strip() if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"loralab_version": __version__, "python": platform.python_version(), "packages": packages,
            "git_commit": commit}


