"""Checkpoints a run can trust: marked complete after the Trainer writes them, rotated only then, found newest
complete first for --resume; and the adapter saved so that an old one is never half-overwritten."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from loralab.errors import LoralabError
from loralab.files import COMPLETE_FILE, completeness, mark_complete, read_jsonl, write_jsonl
from loralab.runs.recovery import NEW_ADAPTER, swap_in_adapter

MODEL_CARD = "README.md"  # an adapter folder's model card (loralab.models.card writes it)
HASH_FILE = "train_hash.txt"  # which config the checkpoints beside it belong to


def read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip() if path.exists() else None
    except (OSError, UnicodeDecodeError):
        return None


def step_of(folder: Path) -> int:
    return int(folder.name.split("-")[-1])


def checkpoints(checkpoints_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest first."""
    found = [p for p in checkpoints_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=step_of, reverse=True)


def newest_checkpoint(checkpoints_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint (rundir.completeness: marked complete, every file as written), and a line
    for each newer one skipped."""
    skipped = []
    for folder in checkpoints(checkpoints_dir):
        _, why = completeness(folder)
        if why is None:
            return folder, skipped
        skipped.append(f"{folder.name} is {why}")
    return None, skipped


class CheckpointGuard(TrainerCallback):
    """After the Trainer writes checkpoint-N: mark it complete (rundir.mark_complete), then remove the oldest
    complete ones beyond train.save_total_limit, and incomplete ones. Written, then marked, then rotated: a
    kill at any instant leaves the previous complete checkpoint in place. A checkpoint saved outside the
    Trainer's save loop (on Ctrl-C, say) counts for --resume only once this on_save has run for it."""

    def __init__(self, checkpoints_dir: Path, train_hash: str, keep: int, earlier_seconds: float = 0.0):
        self.checkpoints_dir, self.train_hash, self.keep = checkpoints_dir, train_hash, keep
        self.earlier_seconds, self.started = earlier_seconds, time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = self.checkpoints_dir / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            # train_seconds: training time up to this checkpoint over every process of the run (a resume adds on)
            seconds = round(self.earlier_seconds + time.perf_counter() - self.started, 3)
            mark_complete(folder, train_hash=self.train_hash, step=state.global_step, train_seconds=seconds)
        complete = 0
        for older in checkpoints(self.checkpoints_dir):
            whole = (older / COMPLETE_FILE).is_file()
            complete += whole
            if not whole or complete > self.keep:
                shutil.rmtree(older, ignore_errors=True)


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop rows logged after the checkpoint so the log has no duplicated or orphaned steps. The file
    is written row by row as the Trainer logs (a kill loses nothing logged), so it is cut here rather than rebuilt
    from the checkpoint's state.log_history."""
    if path.exists():
        write_jsonl(path, [r for r in read_jsonl(path) if r.get("step", 0) <= after_step and "train_runtime" not in r])


def save_adapter(model, adapter_dir: Path, **info) -> None:
    """Save to .adapter-new beside the target, mark it complete, then swap it in (rundir.swap_in_adapter): an old
    adapter is never half-overwritten, and a kill at any instant is finished or undone by the next command."""
    new = adapter_dir.with_name(NEW_ADAPTER)
    shutil.rmtree(new, ignore_errors=True)
    model.save_pretrained(new)
    mark_complete(new, **info)
    swap_in_adapter(new, adapter_dir)


def checkpoint_to_resume(checkpoints_dir: Path, train_hash: str, required: bool) -> Path | None:
    """The newest complete checkpoint of this config (``train_hash``), naming each newer one skipped; with
    ``required`` (--resume) a missing one is an error, otherwise None."""
    folder, skipped = newest_checkpoint(checkpoints_dir)
    same_config = read_text(checkpoints_dir / HASH_FILE) == train_hash
    if not required:
        return folder if same_config else None
    for line in skipped:
        print(f"train: skipping {line}")
    if folder is None:
        found = "only incomplete or damaged checkpoints" if skipped else "no checkpoint"
        raise LoralabError(f"--resume: {found} in {checkpoints_dir}; run `loralab train CONFIG` to start afresh")
    if not same_config:
        raise LoralabError(f"--resume: {folder} was made with a different config; "
                           f"start afresh with `loralab train CONFIG`")
    return folder


def log_reaches(metrics_file: Path, step: int) -> bool:
    """metrics.jsonl is readable and logged the run up to ``step`` (then only the adapter is missing)."""
    try:
        return metrics_file.is_file() and any(r.get("step", 0) >= step for r in read_jsonl(metrics_file))
    except LoralabError:
        return False


def adapter_from_checkpoint(checkpoint: Path, adapter_dir: Path, **info) -> None:
    """Swap in the adapter files of a complete ``checkpoint`` as the run's adapter (as save_adapter does), keeping
    the model card (README.md) the adapter folder had: `loralab card`, merge and export-gguf wrote it there."""
    new = adapter_dir.with_name(NEW_ADAPTER)
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy2(checkpoint / name, new / name)
    card = adapter_dir / MODEL_CARD
    if card.is_file():
        shutil.copy2(card, new / MODEL_CARD)
    mark_complete(new, **info)
    swap_in_adapter(new, adapter_dir)


def start_logs(checkpoints_dir: Path, metrics_file: Path, tensorboard_dir: Path, train_hash: str,
               resume_from: Path | None) -> None:
    """A fresh run clears the old checkpoints and logs; a resumed one drops the checkpoints newer than the one it
    resumes from (incomplete or damaged: newest_checkpoint said so) and the rows logged after it."""
    if resume_from is None:
        shutil.rmtree(checkpoints_dir, ignore_errors=True)
        metrics_file.unlink(missing_ok=True)
        shutil.rmtree(tensorboard_dir, ignore_errors=True)
        checkpoints_dir.mkdir(parents=True)
        (checkpoints_dir / HASH_FILE).write_text(train_hash)
    else:
        for newer in checkpoints(checkpoints_dir):
            if step_of(newer) > step_of(resume_from):
                shutil.rmtree(newer)
        truncate_metrics(metrics_file, step_of(resume_from))


def train_seconds(checkpoint: Path | None) -> float:
    """Training time up to ``checkpoint`` over the processes that made it (its completion record), 0 without one."""
    if checkpoint is None:
        return 0.0
    record, _ = completeness(checkpoint)
    return float((record or {}).get("train_seconds") or 0.0)
