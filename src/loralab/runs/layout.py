"""The run directory ``<output_dir>/<name>/``: where each file lives, and the manifest that records the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loralab import __version__
from loralab.config import ExperimentConfig, dump_config
from loralab.errors import LoralabError
from loralab.files import atomic_write_text, write_json

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
        if not self.manifest_file.exists():
            return {}
        try:
            manifest = json.loads(self.manifest_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise LoralabError(f"cannot read {self.manifest_file} ({type(err).__name__}); it is damaged: "
                               f"delete the run directory {self.root} to start this run afresh") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", {}), dict):
            raise LoralabError(f"{self.manifest_file} is damaged (not a loralab manifest); "
                               f"delete the run directory {self.root} to start this run afresh")
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


