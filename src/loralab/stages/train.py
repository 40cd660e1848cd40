"""The train stage, read top to bottom: decide how the run trains, build the model and the Trainer, train, save.

LoRA on the prepared split with the Hugging Face Trainer (its hooks: loralab.training.trainer), the adapter saved
with PEFT. Everything that can fail on the config, the data or the model is decided and built before any file of
the run directory is touched. Under torchrun or accelerate launch every process runs this with the same config
(DDP): each trains its share of every step's examples, and only the main process (rank 0) writes.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loralab import decisions, devices
from loralab.config import ExperimentConfig
from loralab.cpu.onednn_weights import onednn_weights_available
from loralab.errors import LoralabError, hide_library_deprecations
from loralab.files import read_jsonl, write_json
from loralab.launch import accelerate_cpu_started_one, launched_processes
from loralab.models.gguf import model_source
from loralab.models.loading import add_lora, count_parameters, load_model, read_model_config, resolve_model_source
from loralab.runs.fingerprints import stage_keys
from loralab.runs.layout import RunDir, environment_info
from loralab.runs.protocol import Stage
from loralab.runs.recovery import swap_in_retrain
from loralab.switches import Switches
from loralab.training.callbacks import MetricsLog, StopOnInterrupt
from loralab.training.checkpoints import (
    CheckpointGuard,
    adapter_from_checkpoint,
    checkpoint_to_resume,
    log_reaches,
    save_adapter,
    start_logs,
    step_of,
    train_seconds,
)
from loralab.training.trackers import check_trackers, tracker_callbacks
from loralab.training.trainer import ResponseOnlyTrainer, build_trainer


@dataclass
class Training:
    """What a train run has built before it touches a file: its switches, the model, the Trainer and the callbacks
    the recipe reads afterwards, and the facts the manifest records."""

    switches: Switches
    model: Any
    trainer: ResponseOnlyTrainer
    log: MetricsLog
    stop: StopOnInterrupt
    manifest: dict = field(default_factory=dict)


@hide_library_deprecations
def run(cfg: ExperimentConfig, resume: bool = False, force: bool = False) -> str:
    """Train LoRA adapters; write adapter/, metrics.jsonl and checkpoints/; return the stage hash.

    A finished checkpoint completes an adapter that is missing or damaged (and --resume on a finished run does
    nothing). Over a finished run the new one trains beside it, in <run>/.retrain/, and replaces it only once it
    has finished (``force``: afresh in place)."""
    rundir = RunDir(cfg)
    keys = stage_keys(cfg)
    stage = Stage(rundir, keys.train, upstream=keys.prepare)
    stage.require_upstream()
    rank, processes = launched_processes()
    main = rank == 0
    if accelerate_cpu_started_one():
        _say("train: `accelerate launch --cpu` started one process, whatever --num_processes says; for N processes on "
             "CPUs use `accelerate launch --multi_gpu --num_processes N -m loralab train CONFIG` (gloo)")
    if stage.up_to_date(force):
        steps = stage.records.stage_record("train").get("steps")
        state = "the run has already finished" if resume else "up to date"
        _say(f"train: {state} (step {steps}, {rundir.adapter_dir})" + ("; nothing to resume" if resume else ""))
        return stage.hash
    out = _training_dir(rundir, stage, force, resume)
    work = stage if out is rundir else Stage(out, keys.train, upstream=keys.prepare)
    resume_from = checkpoint_to_resume(out.checkpoints_dir, stage.hash, required=resume) if resume or not force \
        else None
    if resume_from is not None and step_of(resume_from) >= cfg.train.max_steps \
            and log_reaches(out.metrics_file, step_of(resume_from)):
        if main:
            _begin(rundir, out, resume_from)
            _finish_from_checkpoint(out, work, resume_from)
            _swap_in(rundir, out)
        return stage.hash
    if not resume:
        resume_from = None
    per_process = decisions.per_process_examples(cfg.train, processes)  # before anything is loaded or written

    start = time.perf_counter()
    training = setup(cfg, out, stage.hash, processes, per_process, resume_from)
    if main:
        _begin(rundir, out, resume_from)
    with work.attempt() if main else contextlib.nullcontext(), _keeping(rundir, out):
        if main:
            out.update_manifest(**training.manifest)
        step = fit(cfg, out, stage.hash, training, resume_from)
        if main:
            save_adapter(training.model, out.adapter_dir, train_hash=stage.hash, step=step)
            work.done(time.perf_counter() - start, steps=step)
    if main:
        _swap_in(rundir, out)
    _say(f"train: adapter saved to {rundir.adapter_dir}")
    return stage.hash


class Retrain(RunDir):
    """The run directory as a retrain over a finished run writes it: its checkpoints/, metrics.jsonl, tensorboard/,
    adapter/, config.yaml and manifest (the attempt's own record) in RunDir.retrain_dir, laid out as the run is,
    until runs.recovery.swap_in_retrain moves them in; the prepared data read from the run."""

    def __init__(self, run: RunDir):
        super().__init__(run.cfg)
        self.run, self.root = run, run.retrain_dir

    @property
    def data_dir(self) -> Path:
        return self.run.data_dir


def _training_dir(rundir: RunDir, stage: Stage, force: bool, resume: bool) -> RunDir:
    """Where this attempt trains: in place for a first train, over a run that did not finish or with --force;
    beside a finished run (its files whole) in <run>/.retrain/, so that a failed or killed attempt leaves it as
    it was."""
    if force or not stage.records.finished_whole("train"):
        return rundir
    out, steps = Retrain(rundir), stage.records.stage_record("train").get("steps")
    if resume and not out.checkpoints_dir.is_dir():
        made = " was made with a different config," if stage.records.recorded_hash("train") != stage.hash else ""
        raise LoralabError(f"--resume: the finished run in {rundir.root} (step {steps}){made} and no retrain was "
                           f"started beside it (in {out.root}); run `loralab train CONFIG` to retrain (the finished "
                           f"run is kept until the new one finishes)")
    _say(f"train: the finished run in {rundir.root} (step {steps}) stays as it is until this one finishes; "
         f"training in {out.root} (--force: afresh in place)")
    return out


def _begin(rundir: RunDir, out: RunDir, resume_from: Path | None) -> None:
    """A retrain's staging area, afresh unless it resumes, with a copy of the run's manifest (the stages before
    train, and the facts a resumed attempt recorded) for the attempt to record itself in."""
    if out is rundir:
        return
    staged = {}
    if resume_from is None:
        shutil.rmtree(out.root, ignore_errors=True)
    else:
        with contextlib.suppress(LoralabError):  # the attempt's own record only: the run's manifest is what counts
            staged = out.manifest()
    out.root.mkdir(exist_ok=True)
    write_json(out.manifest_file, {**rundir.manifest(), **{k: v for k, v in staged.items() if k != "stages"}})


@contextlib.contextmanager
def _keeping(rundir: RunDir, out: RunDir):
    """A retrain that stops before it finishes says that the finished run is still there, and how to go on."""
    try:
        yield
    except BaseException:
        if out is not rundir:
            _say(f"train: the finished run in {rundir.root} is kept as it was; this retrain's checkpoints are in "
                 f"{out.checkpoints_dir} (`loralab train CONFIG --resume` with the same settings continues it)")
        raise


def _swap_in(rundir: RunDir, out: RunDir) -> None:
    """A finished retrain replaces the run: adapter, checkpoints, logs, config.yaml and manifest (recoverable at
    every instant: runs.recovery.swap_in_retrain)."""
    if out is not rundir:
        swap_in_retrain(out.root, rundir.root)
        print(f"train: the new run replaced the previous one in {rundir.root}")


def decide(cfg: ExperimentConfig, train_examples: list[dict]) -> Switches:
    """How this run trains on the device it finds (loralab.decisions), before any weight is loaded; what a decision
    did that the user should hear about is printed."""
    facts = devices.probe(devices.detect_device(cfg.train.device))
    onednn = facts.kind == "cpu" and onednn_weights_available(torch.bfloat16)
    model_config = read_model_config(cfg.model) if decisions.needs_estimate(cfg.train, facts.kind, onednn) else None
    switches = decisions.decide_switches(cfg, facts, *decisions.example_lengths(train_examples), model_config,
                                         onednn_available=onednn)
    for note in switches.notes:
        _say(f"train: {note}")
    return switches


def build_model(cfg: ExperimentConfig, switches: Switches):
    """The base model in the compute dtype with fresh LoRA adapters; read into memory rather than mapped when its
    weights will take oneDNN's layout (see load_model)."""
    torch.manual_seed(cfg.train.seed)
    base = load_model(cfg.model, switches.precision, switches.device, in_memory=switches.onednn_weights,
                      load_in_4bit=cfg.train.load_in_4bit)
    return add_lora(base, cfg.lora)


def setup(cfg: ExperimentConfig, rundir: RunDir, train_hash: str, processes: int, per_process: int,
          resume_from: Path | None = None) -> Training:
    """Everything that can fail on the config, the data or the model, in dependency order, before any file is
    touched."""
    check_trackers(cfg)  # a missing tracker package is said before any weight is loaded
    train_examples = _examples(rundir.train_file)
    eval_examples = _examples(rundir.eval_file)
    # Decided before loading: weights that will take oneDNN's layout are read into memory (load_model).
    switches = decide(cfg, train_examples)
    model = build_model(cfg, switches)
    counts = count_parameters(model)
    name = devices.device_name(switches.device)
    _say(f"train: {counts} on {switches.device} ({name}), precision {switches.precision}")
    if processes > 1:
        _say(f"train: {processes} processes x {per_process} examples = {processes * per_process} examples per "
             f"optimizer step (train.per_device_train_batch_size x gradient_accumulation_steps, split over the "
             f"processes)")
    earlier = train_seconds(resume_from)  # a resumed run's runtime counts its earlier processes too
    log = MetricsLog(rundir.metrics_file, switches.precision, cfg.train.eval_loss_steps,
                     lora_alpha=cfg.lora.lora_alpha, learning_rate=cfg.train.learning_rate, earlier_seconds=earlier)
    stop = StopOnInterrupt()
    guard = CheckpointGuard(rundir.checkpoints_dir, train_hash, cfg.train.save_total_limit, earlier_seconds=earlier)
    trainer = build_trainer(cfg, model, train_examples, rundir.checkpoints_dir, [log, stop, guard], switches,
                            eval_examples)
    log.example_losses = lambda: trainer.example_losses
    manifest = {
        **environment_info(), "model_source": model_source(resolve_model_source(cfg.model)),
        "device": switches.device, "device_name": name, "precision": switches.precision,
        "parameters": counts.as_dict(), "processes": processes,
        "gradient_checkpointing": trainer.args.gradient_checkpointing, "row_tokens": switches.row_tokens,
        "onednn_weights": switches.onednn_weights,
    }
    return Training(switches, model, trainer, log, stop, manifest)


def fit(cfg: ExperimentConfig, rundir: RunDir, train_hash: str, training: Training, resume_from: Path | None) -> int:
    """Run the Trainer from scratch or from ``resume_from``; return the step it reached. A stop by the watchdog is
    raised as its error, a Ctrl-C before max_steps as KeyboardInterrupt naming the checkpoint to resume from."""
    trainer, log, stop = training.trainer, training.log, training.stop
    if resume_from is not None:
        _say(f"train: resuming from step {step_of(resume_from)} ({resume_from})")
    if launched_processes()[0] == 0:
        start_logs(rundir.checkpoints_dir, rundir.metrics_file, rundir.root / "tensorboard", train_hash, resume_from)
    # The TensorBoard writer opens its event file at once: made after start_logs cleared the old ones.
    for callback in tracker_callbacks(cfg, cfg.run_dir, step_of(resume_from) if resume_from else 0,
                                      tensorboard_dir=rundir.root / "tensorboard"):
        trainer.add_callback(callback)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        _close_progress_bars(trainer)  # so an error message starts on its own line, not after a bar
    if log.failure is not None:
        raise log.failure
    step = trainer.state.global_step
    if stop.requested and step < cfg.train.max_steps:
        raise KeyboardInterrupt(f"checkpoint saved at step {step} of {cfg.train.max_steps} in "
                                f"{rundir.checkpoints_dir}; resume with `loralab train CONFIG --resume`")
    return step


def _finish_from_checkpoint(rundir: RunDir, stage: Stage, checkpoint: Path) -> None:
    """The run reached max_steps (its last checkpoint is complete) but its adapter is missing, damaged or was
    never swapped in: take the adapter from that checkpoint instead of training again."""
    start = time.perf_counter()
    with stage.attempt():
        adapter_from_checkpoint(checkpoint, rundir.adapter_dir, train_hash=stage.hash, step=step_of(checkpoint))
        stage.done(time.perf_counter() - start, steps=step_of(checkpoint))
    print(f"train: the run had finished at step {step_of(checkpoint)}; adapter taken from {checkpoint} "
          f"-> {rundir.adapter_dir}")


def _examples(path: Path) -> list[dict]:
    return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in read_jsonl(path)]


def _say(text: str) -> None:
    """Print on the main process only (under torchrun/accelerate each process would repeat it)."""
    if launched_processes()[0] == 0:
        print(text)


def _close_progress_bars(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None
