"""Experiment trackers (train.report_to): TensorBoard in the run directory, MLflow and W&B kept there too."""

from __future__ import annotations

import os
from pathlib import Path

from loralab.config import ExperimentConfig
from loralab.errors import LoralabError
from loralab.launch import launched_processes

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(cfg: ExperimentConfig) -> None:
    """Each tracker in train.report_to needs its package; say which to install before any weight is loaded."""
    import importlib.util

    for name in cfg.train.report_to:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise LoralabError(f"train.report_to lists {name}, but its package is not installed: pip install "
                               f"{TRACKER_PACKAGES[name]} (or remove {name} from train.report_to)")


def tracker_callbacks(cfg: ExperimentConfig, run_root: Path, resume_step: int = 0,
                      tensorboard_dir: Path | None = None) -> list:
    """The Trainer's TensorBoard callback writing into <run>/tensorboard/ (or ``tensorboard_dir``: a retrain's
    staging area) on the main process only, and environment defaults that keep MLflow and W&B in the run directory
    (W&B offline without an API key) unless set."""
    callbacks = []
    main_process = launched_processes()[0] == 0
    if "tensorboard" in cfg.train.report_to and main_process:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        # purge_step: TensorBoard hides what an interrupted run logged after the checkpoint resumed from
        writer = SummaryWriter(log_dir=str(tensorboard_dir or run_root / "tensorboard"),
                               purge_step=resume_step + 1 if resume_step else None)
        callbacks.append(TensorBoardCallback(writer))
    if "mlflow" in cfg.train.report_to:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (run_root / "mlruns").resolve().as_uri())
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", cfg.name)
    if "wandb" in cfg.train.report_to:
        os.environ.setdefault("WANDB_DIR", str(run_root.resolve()))
        os.environ.setdefault("WANDB_PROJECT", "loralab")
        if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
            os.environ["WANDB_MODE"] = "offline"
            if main_process:
                print(f"train: W&B logs offline into {run_root / 'wandb'} (no WANDB_API_KEY); "
                      "`wandb sync` uploads them")
    return callbacks
