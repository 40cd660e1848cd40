"""The reliability suite: bad configs, mismatched runs, a held lock, damaged or hostile files, interrupted saves.

One finished tiny run is built once (session fixture) with relative paths, and each case works on a copy of it
(shutil.copytree), so a case may damage anything. Most cases run in-process through loralab.cli.main; the
kill -9, concurrency and Ctrl-C cases are real processes. Every refusal case asserts the exit code, exactly
one stderr line, no traceback, and that every file of the run directory is unchanged (sha256 before and after).
"""

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import subprocess_env

from loralab import cli, files
from loralab.runs import lock, recovery
from loralab.training import checkpoints, trainer

RUN = Path("runs/t")  # the run directory, relative to a case's working copy
CONFIG = {
    "name": "t",
    "output_dir": "runs",
    "model": {"name_or_path": "./model"},
    "data": {"path": "./data.json", "num_examples": None, "eval_size": 4, "max_length": 128},
    "train": {"max_steps": 4, "logging_steps": 1, "save_steps": 2, "gradient_accumulation_steps": 2, "warmup_steps": 1,
              "device": "cpu", "save_total_limit": 2},
    "eval": {"max_new_tokens": 4, "num_examples": 2, "prompts": ["Name a colour."]},
}


@pytest.fixture(scope="session")
def finished(tmp_path_factory, tiny_model_dir, alpaca_records) -> Path:
    """A folder holding model/, data.json, exp.yaml and runs/t/, a run finished by `loralab run`."""
    base = tmp_path_factory.mktemp("finished")
    shutil.copytree(tiny_model_dir, base / "model")
    (base / "data.json").write_text(json.dumps(alpaca_records[:24]))
    (base / "exp.yaml").write_text(yaml.safe_dump(CONFIG))
    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert cli.main(["run", "exp.yaml"]) == 0
    finally:
        os.chdir(cwd)
    return base


@pytest.fixture
def work(finished, tmp_path, monkeypatch) -> Path:
    """A private copy of the finished run, the working directory for the case."""
    copy = tmp_path / "w"
    shutil.copytree(finished, copy, symlinks=True)
    monkeypatch.chdir(copy)
    return copy


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def error_lines(err: str) -> list[str]:
    """stderr without progress bars (tqdm redraws with carriage returns)."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line
            and "s/it]" not in line and not line.lstrip().startswith(("0%", "train", "eval:"))]


def assert_one_line(err: str, fragment: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("loralab: error:") and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# Setups: each damages the working copy ``w`` (the run is w / RUN) before the command runs.

def _manifest(w: Path) -> dict:
    return json.loads((w / RUN / "manifest.json").read_text())


def _set_manifest(w: Path, manifest: dict) -> None:
    (w / RUN / "manifest.json").write_text(json.dumps(manifest))


def set_status(stage: str, status: str):
    def setup(w):
        m = _manifest(w)
        m["stages"][stage]["status"] = status
        _set_manifest(w, m)
    return setup


def set_record(stage: str, key: str, value):
    def setup(w):
        m = _manifest(w)
        m["stages"][stage][key] = value
        _set_manifest(w, m)
    return setup


def append(rel: str, text: str):
    def setup(w):
        with open(w / rel, "a", encoding="utf-8") as f:
            f.write(text)
    return setup


def truncate(rel: str, keep: float = 0.5):
    def setup(w):
        path = w / rel
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return setup


def replace_file(rel: str, data: bytes):
    def setup(w):
        (w / rel).write_bytes(data)
    return setup


def remove(*rels: str):
    def setup(w):
        for rel in rels:
            path = w / rel
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return setup


def unmark_checkpoints(*steps: int):
    return remove(*[f"{RUN}/checkpoints/checkpoint-{s}/{files.COMPLETE_FILE}" for s in steps])


def write_data(records) -> callable:
    def setup(w):
        (w / "data.json").write_text(json.dumps(records))
    return setup


def deeply_nested(w):
    (w / "data.json").write_text("[" * 100_000 + "]" * 100_000)


class Exploit:
    """A pickle that would create the file PWNED if it were ever unpickled without weights_only."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def malicious_pickle(rel: str):
    return replace_file(rel, pickle.dumps(Exploit()))


def pickle_model(w):
    """The model folder's weights replaced by a hostile pytorch_model.bin (no safetensors)."""
    (w / "model" / "model.safetensors").unlink()
    (w / "model" / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))


def both(*setups):
    def setup(w):
        for s in setups:
            s(w)
    return setup


# ---------------------------------------------------------------------------------------------------
# The table: (case id, argv after the command's config, setup, expected fragment of the one stderr line).
# Every case exits 2 and leaves the run directory exactly as it was.

def _cfg(command: str, *overrides: str) -> list[str]:
    return [command, "exp.yaml", *[x for o in overrides for x in ("--set", o)]]


ALPACA_FEW = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(10)]

REFUSALS = [
    # Config ranges: refused at load, before any file is touched.
    ("bogus-scheduler", _cfg("train", "train.lr_scheduler_type=bogus"), None, "train.lr_scheduler_type"),
    ("plateau-scheduler", _cfg("train", "train.lr_scheduler_type=reduce_lr_on_plateau"), None,
     "train.lr_scheduler_type"),
    ("negative-lr", _cfg("train", "train.learning_rate=-1"), None, "train.learning_rate"),
    ("zero-lr", _cfg("train", "train.learning_rate=0"), None, "train.learning_rate"),
    ("nan-lr", _cfg("train", "train.learning_rate=.nan"), None, "train.learning_rate"),
    ("negative-warmup", _cfg("train", "train.warmup_steps=-5"), None, "train.warmup_steps"),
    ("zero-alpha", _cfg("train", "lora.lora_alpha=0"), None, "nothing would be trained"),
    ("negative-alpha", _cfg("train", "lora.lora_alpha=-4"), None, "lora.lora_alpha"),
    ("zero-batch", _cfg("train", "train.per_device_train_batch_size=0"), None, "train.per_device_train_batch_size"),
    ("zero-accumulation", _cfg("train", "train.gradient_accumulation_steps=0"), None,
     "train.gradient_accumulation_steps"),
    ("zero-max-steps", _cfg("train", "train.max_steps=0"), None, "train.max_steps"),
    ("zero-save-steps", _cfg("train", "train.save_steps=0"), None, "train.save_steps"),
    ("zero-save-limit", _cfg("train", "train.save_total_limit=0"), None, "train.save_total_limit"),
    ("negative-decay", _cfg("train", "train.weight_decay=-0.1"), None, "train.weight_decay"),
    ("negative-clip", _cfg("train", "train.max_grad_norm=-1"), None, "train.max_grad_norm"),
    ("negative-eval-steps", _cfg("train", "train.eval_loss_steps=-1"), None, "train.eval_loss_steps"),
    ("zero-rank", _cfg("train", "lora.r=0"), None, "lora.r"),
    ("dropout-one", _cfg("train", "lora.lora_dropout=1.0"), None, "lora.lora_dropout"),
    ("unknown-key", _cfg("train", "train.max_stepz=3"), None, "unknown config key 'train.max_stepz'"),
    ("wrong-type", _cfg("train", "train.max_steps=abc"), None, "must be an integer"),
    ("eval-zero-examples", _cfg("eval", "eval.num_examples=0"), None, "eval.num_examples"),
    ("eval-zero-batch", _cfg("eval", "eval.batch_size=0"), None, "eval.batch_size"),
    ("eval-zero-new-tokens", _cfg("eval", "eval.max_new_tokens=0"), None, "eval.max_new_tokens"),
    ("prepare-zero-length", _cfg("prepare", "data.max_length=0"), None, "data.max_length"),
    ("prepare-negative-eval-size", _cfg("prepare", "data.eval_size=-1"), None, "data.eval_size"),
    ("run-bogus-scheduler", _cfg("run", "train.lr_scheduler_type=bogus"), None, "train.lr_scheduler_type"),
    ("report-negative-lr", _cfg("report", "train.learning_rate=-1"), None, "train.learning_rate"),
    ("missing-config", ["train", "nope.yaml"], None, "config file not found"),
    ("invalid-yaml", ["train", "exp.yaml"], replace_file("exp.yaml", b"name: [t\n"), "not valid YAML"),
    # One source of truth: a config that differs from the run's in what a stage depends on.
    ("report-other-rank", _cfg("report", "lora.r=4"), None, "lora.r: 8 in the run, 4 now"),
    ("eval-other-rank", _cfg("eval", "lora.r=4"), None, "lora.r: 8 in the run, 4 now"),
    ("report-other-eval", _cfg("report", "eval.max_new_tokens=9"), None, "eval.max_new_tokens: 4 in the run, 9 now"),
    ("report-other-prompts", _cfg("report", "eval.prompts=[Hi]"), None, "eval.prompts"),
    ("report-other-seed", _cfg("report", "data.seed=1"), None, "data.seed: 42 in the run, 1 now"),
    ("eval-other-steps", _cfg("eval", "train.max_steps=5"), None, "train.max_steps: 4 in the run, 5 now"),
    ("resume-other-rank", _cfg("train", "lora.r=4") + ["--resume"], None, "different config"),
    ("train-other-data-seed", _cfg("train", "data.seed=7"), None, "'prepare' outputs"),
    ("report-train-failed", _cfg("report"), set_status("train", "failed"), "'train' stage failed"),
    ("report-train-interrupted", _cfg("report"), set_status("train", "interrupted"), "interrupted (Ctrl-C)"),
    ("eval-train-killed", _cfg("eval"), set_status("train", "running"), "stopped before it finished"),
    ("report-eval-killed", _cfg("report"), set_status("eval", "running"), "'eval' stage was stopped"),
    ("report-eval-of-old-train", _cfg("report"), set_record("eval", "upstream", "0" * 16),
     "earlier attempt of 'train'"),
    ("eval-model-replaced", _cfg("eval"), append("model/model.safetensors", "x"), "model files"),
    ("eval-model-config-changed", _cfg("eval"), append("model/config.json", "\n"), "model files"),
    ("eval-tokenizer-changed", _cfg("eval"), append("model/tokenizer_config.json", "\n"), "tokenizer files"),
    ("eval-data-changed", _cfg("eval"), append("data.json", " "), "data file"),
    ("train-data-changed", _cfg("train"), append("data.json", " "), "'prepare' outputs"),
    # Damaged files in the run directory.
    ("report-junk-metrics", _cfg("report"), append(f"{RUN}/metrics.jsonl", "not json\n"), "metrics.jsonl was changed"),
    ("report-junk-eval-csv", _cfg("report"), append(f"{RUN}/eval_results.csv", "x,,\n"),
     "eval_results.csv was changed"),
    ("eval-truncated-adapter", _cfg("eval"), truncate(f"{RUN}/adapter/adapter_model.safetensors"),
     "adapter_model.safetensors"),
    ("eval-junk-adapter-config", _cfg("eval"), replace_file(f"{RUN}/adapter/adapter_config.json", b"{"),
     "adapter_config.json"),
    ("eval-missing-adapter", _cfg("eval"), remove(f"{RUN}/adapter"), "needs the outputs of 'train'"),
    ("train-truncated-split", _cfg("train"), truncate(f"{RUN}/data/train.jsonl"), "data/train.jsonl was changed"),
    ("eval-truncated-split", _cfg("eval"), truncate(f"{RUN}/data/eval.jsonl"), "data/eval.jsonl was changed"),
    ("report-junk-config-yaml", _cfg("report"), replace_file(f"{RUN}/config.yaml", b"a: [\n"), "cannot report"),
    ("train-truncated-model", _cfg("train", "train.max_steps=6"), truncate("model/model.safetensors"),
     "cannot load a model"),
    ("train-pickle-model", _cfg("train", "train.max_steps=6"), pickle_model, "cannot load a model"),
    ("train-bad-targets", _cfg("train", "lora.target_modules=[nope]"), None, "lora.target_modules"),
    # Checkpoints.
    ("resume-no-checkpoints", _cfg("train") + ["--resume"],
     both(set_status("train", "failed"), remove(f"{RUN}/checkpoints")), "no checkpoint"),
    ("resume-all-incomplete", _cfg("train") + ["--resume"],
     both(set_status("train", "failed"), unmark_checkpoints(2, 4)), "only incomplete or damaged checkpoints"),
    ("resume-all-damaged", _cfg("train") + ["--resume"],
     both(set_status("train", "failed"), malicious_pickle(f"{RUN}/checkpoints/checkpoint-4/optimizer.pt"),
          truncate(f"{RUN}/checkpoints/checkpoint-2/optimizer.pt")), "only incomplete or damaged checkpoints"),
    ("resume-no-hash-file", _cfg("train") + ["--resume"],
     both(set_status("train", "failed"), remove(f"{RUN}/checkpoints/{checkpoints.HASH_FILE}")), "different config"),
    # Data: too little, empty, hostile.
    ("prepare-deep-json", _cfg("prepare") + ["--force"], deeply_nested, "nests JSON too deeply"),
    ("prepare-all-empty", _cfg("prepare") + ["--force"],
     write_data([{"instruction": f"Q{i}", "output": " "} for i in range(20)]), "empty answer"),
    ("prepare-eval-too-big", _cfg("prepare", "data.eval_size=8") + ["--force"], write_data(ALPACA_FEW),
     "data.eval_size 8 leaves only 2 of the 10 records"),
    ("prepare-eval-all", _cfg("prepare", "data.eval_size=10") + ["--force"], write_data(ALPACA_FEW),
     "data.eval_size 10 holds out all 10 records"),
    ("prepare-no-records", _cfg("prepare") + ["--force"], write_data([]), "holds no records"),
    ("prepare-missing-data", _cfg("prepare") + ["--force"], remove("data.json"), "data file not found"),
]


@pytest.mark.parametrize("case, argv, setup, fragment", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refusal_leaves_the_run_untouched(work, capsys, case, argv, setup, fragment):
    if setup is not None:
        setup(work)
    before = tree_hashes(work / RUN)
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert_one_line(capsys.readouterr().err, fragment)
    assert tree_hashes(work / RUN) == before
    assert not (work / "PWNED").exists()


def test_the_suite_has_sixty_cases_of_its_own():
    assert len(REFUSALS) + len(RECOVERIES) + 3 >= 60  # + the three real-process cases


# ---------------------------------------------------------------------------------------------------
# A second process, and files the operating system refuses.

@pytest.mark.parametrize("command", ["train", "eval", "report", "run", "prepare"])
def test_a_held_lock_names_its_holder(work, capsys, command):
    with lock.run_lock(work / RUN, "train"):
        before = tree_hashes(work / RUN)
        assert cli.main([command, "exp.yaml", "--force"] if command != "report" else [command, "exp.yaml"]) == 2
        line = assert_one_line(capsys.readouterr().err, f"is in use by `loralab train` (PID {os.getpid()} on ")
        assert "wait for it to finish" in line
        assert tree_hashes(work / RUN) == before
    assert not (work / RUN / lock.LOCK_FILE).exists()  # released


def test_a_stale_lock_is_taken_over(work, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (work / RUN / lock.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": "h", "command": "train"}))
    assert cli.main(["report", "exp.yaml"]) == 0
    out = capsys.readouterr().out
    assert f"locked by PID {dead.pid} on h, which is no longer running" in out
    assert not (work / RUN / lock.LOCK_FILE).exists()


def test_unreadable_data_file(work, capsys, monkeypatch):
    if os.geteuid() == 0:  # root reads anything: make the read itself fail as a permission error would
        real = Path.open

        def refuse(self, *args, **kwargs):
            if self.name == "data.json":
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refuse)
        monkeypatch.setattr("builtins.open", lambda f, *a, **k: refuse(Path(f), *a, **k))
    else:
        (work / "data.json").chmod(0)
    before = tree_hashes(work / RUN)
    assert cli.main(["prepare", "exp.yaml", "--force"]) == 2
    assert_one_line(capsys.readouterr().err, "cannot read data file")
    assert tree_hashes(work / RUN) == before


def test_read_only_output_dir(work, capsys, monkeypatch):
    if os.geteuid() == 0:  # root writes anywhere: fail the lock file's creation as a read-only folder would
        real = os.open

        def refuse(path, *args, **kwargs):
            if str(path).endswith(lock.LOCK_FILE):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
    else:
        (work / RUN).chmod(0o555)
    assert cli.main(["report", "exp.yaml"]) == 2
    assert_one_line(capsys.readouterr().err, "choose a writable output_dir")


# ---------------------------------------------------------------------------------------------------
# Recoveries: the command succeeds and repairs what a killed process left, without training again.

def adapter_bytes(w: Path) -> bytes:
    return (w / RUN / "adapter/adapter_model.safetensors").read_bytes()


def killed_between_renames(w):
    """The swap's state after `adapter -> .adapter-old` and before `.adapter-new -> adapter`."""
    run = w / RUN
    shutil.copytree(run / "adapter", run / recovery.NEW_ADAPTER)
    (run / "adapter").rename(run / recovery.OLD_ADAPTER)


def killed_before_swap(w):
    shutil.copytree(w / RUN / "adapter", w / RUN / recovery.NEW_ADAPTER)
    (w / RUN / recovery.NEW_ADAPTER / files.COMPLETE_FILE).unlink()


def legacy_temp_folder(w):
    (w / RUN / ".adapter-k2j4x").mkdir()
    (w / RUN / ".adapter-k2j4x" / "adapter_model.safetensors").write_bytes(b"half")
    (w / RUN / "data" / ".train.jsonl.abc.tmp").write_text("half")


def killed_after_swap(w):
    set_status("train", "running")(w)


# (case id, argv, setup, fragment of stdout, expected rc)
RECOVERIES = [
    ("resume-finished", _cfg("train") + ["--resume"], None, "the run has already finished (step 4"),
    ("between-renames", _cfg("train"), killed_between_renames, "finished an adapter save that was interrupted"),
    ("before-swap", _cfg("train"), killed_before_swap, "train: up to date"),
    ("stale-temp-folders", _cfg("report"), legacy_temp_folder, "report:"),
    ("after-swap-before-manifest", _cfg("train"), killed_after_swap, "adapter taken from"),
    ("truncated-adapter", _cfg("train"), truncate(f"{RUN}/adapter/adapter_model.safetensors"), "adapter taken from"),
    ("missing-adapter", _cfg("train"), remove(f"{RUN}/adapter"), "adapter taken from"),
    # A damaged manifest is moved aside and rebuilt from the run's files (tests/test_error_causes.py has the rest).
    ("junk-manifest", _cfg("run"), replace_file(f"{RUN}/manifest.json", b"{"), "moved it to manifest.json.damaged"),
    ("list-manifest", _cfg("run"), replace_file(f"{RUN}/manifest.json", b"[]"), "moved it to manifest.json.damaged"),
]


@pytest.mark.parametrize("case, argv, setup, fragment", RECOVERIES, ids=[c[0] for c in RECOVERIES])
def test_recovery_without_training(work, capsys, finished, case, argv, setup, fragment):
    if setup is not None:
        setup(work)
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert fragment in captured.out and "Traceback" not in captured.err and not error_lines(captured.err), captured
    assert "trainable params" not in captured.out  # no model was built: nothing trained
    assert adapter_bytes(work) == adapter_bytes(finished)
    assert sorted(p.name for p in (work / RUN).iterdir() if p.name.startswith(".")) == []
    assert cli.main(["eval", "exp.yaml"]) == 0 and "eval: up to date" in capsys.readouterr().out


def test_resume_skips_an_incomplete_checkpoint_and_logs_the_whole_run(work, capsys, finished):
    unmark_checkpoints(4)(work)
    set_status("train", "failed")(work)
    rows = [json.loads(x) for x in (work / RUN / "metrics.jsonl").read_text().splitlines()]
    assert cli.main(["train", "exp.yaml", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint-4 is incomplete (its save was interrupted)" in out
    after = [json.loads(x) for x in (work / RUN / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after if "loss" in r] == [1, 2, 3, 4]
    summary = [r for r in after if "train_runtime" in r][-1]
    losses = [r["loss"] for r in after if "loss" in r]
    assert summary["train_loss"] == pytest.approx(sum(losses) / 4)  # the whole run, not only steps 3 and 4
    assert [r["loss"] for r in rows if "loss" in r][:2] == losses[:2]
    assert (work / RUN / "checkpoints/checkpoint-4" / files.COMPLETE_FILE).is_file()


def test_resume_skips_a_hostile_optimizer_state_unread(work, capsys):
    malicious_pickle(f"{RUN}/checkpoints/checkpoint-4/optimizer.pt")(work)
    set_status("train", "failed")(work)
    assert cli.main(["train", "exp.yaml", "--resume"]) == 0
    assert "skipping checkpoint-4 is damaged (optimizer.pt changed or truncated)" in capsys.readouterr().out
    assert not (work / "PWNED").exists()


def test_report_never_rewrites_config_yaml(work, capsys):
    before = (work / RUN / "config.yaml").read_bytes()
    assert cli.main(["report", "exp.yaml"]) == 0
    assert (work / RUN / "config.yaml").read_bytes() == before


def test_a_failed_train_is_never_up_to_date(work, capsys):
    set_status("train", "failed")(work)
    unmark_checkpoints(2, 4)(work)  # nothing to finish from: the run trains again
    assert cli.main(["run", "exp.yaml"]) == 0
    out = capsys.readouterr().out
    assert "train: up to date" not in out and "train: adapter saved" in out and "eval: up to date" not in out
    assert _manifest(work)["stages"]["train"]["status"] == "done"


# ---------------------------------------------------------------------------------------------------
# Guards against silent nonsense.

def test_zero_gradient_stops_with_the_reason(work, capsys, monkeypatch):
    real = trainer.response_loss_sum
    monkeypatch.setattr(trainer, "response_loss_sum",
                        lambda model, batch: (lambda l, n: (l * 0, n))(*real(model, batch)))
    assert cli.main(["train", "exp.yaml", "--force"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "gradient norm is exactly 0 at step 1" in err[0] and "lora.lora_alpha" in err[0]
    assert _manifest(work)["stages"]["train"]["status"] == "failed"


def test_a_frozen_loss_stops_with_the_reason(work, capsys, monkeypatch):
    real = trainer.response_loss_sum

    def frozen(model, batch):  # the value never moves, the gradient is not zero: a collapsed model
        loss, n = real(model, batch)
        return loss - loss.detach() + 7.0 * n, n

    monkeypatch.setattr(trainer, "response_loss_sum", frozen)
    assert cli.main(["train", "exp.yaml", "--force", "--set", "train.max_steps=8", "--set", "train.save_steps=8"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "has stayed at 7.000000 over 5 logged steps" in err[0] and "learning_rate" in err[0]


def test_special_tokens_in_answers_are_escaped_and_counted(work, capsys):
    records = [{"instruction": f"Q{i}", "output": f"a </s> b {i}"} for i in range(20)]
    write_data(records)(work)
    assert cli.main(["prepare", "exp.yaml"]) == 0
    assert "20 special-token strings in the text escaped" in capsys.readouterr().out
    stats = json.loads((work / RUN / "data/stats.json").read_text())
    assert stats["escaped_special_tokens"] == 20
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(work / "model").eos_token_id
    for line in (work / RUN / "data/train.jsonl").read_text().splitlines():
        labels = [t for t in json.loads(line)["labels"] if t != -100]
        assert labels.count(eos) == 1 and labels[-1] == eos  # only the real end of the answer


def test_empty_answers_are_dropped_and_counted(work, capsys):
    records = [{"instruction": f"Q{i}", "output": "" if i % 4 == 0 else f"A{i}"} for i in range(24)]
    write_data(records)(work)
    assert cli.main(["prepare", "exp.yaml"]) == 0
    assert "6 records with an empty answer dropped" in capsys.readouterr().out
    assert json.loads((work / RUN / "data/stats.json").read_text())["empty_outputs"] == 6


def test_a_smaller_dataset_than_asked_is_said(work, capsys):
    assert cli.main(["prepare", "exp.yaml", "--set", "data.num_examples=1000"]) == 0
    assert "warning: data.num_examples is 1000 but ./data.json holds 24 usable records" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# Real processes: kill -9 during a checkpoint save, two trains at once, Ctrl-C.

KILL_DURING_SAVE = """
import os, signal, sys
import transformers
from loralab import cli
real = transformers.Trainer._save_optimizer_and_scheduler
def save_then_die(self, output_dir):
    real(self, output_dir)
    if output_dir.endswith("checkpoint-4"):  # adapter and optimizer written; RNG and trainer state not yet
        os.kill(os.getpid(), signal.SIGKILL)
transformers.Trainer._save_optimizer_and_scheduler = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_kill_9_during_a_checkpoint_save_then_resume(work, finished, capsys):
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, "train", "exp.yaml", "--force"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt4 = work / RUN / "checkpoints/checkpoint-4"
    assert ckpt4.is_dir() and not (ckpt4 / "trainer_state.json").exists()
    assert _manifest(work)["stages"]["train"]["status"] == "running"
    assert cli.main(["report", "exp.yaml"]) == 2  # the killed attempt is never reported
    assert "stopped before it finished" in capsys.readouterr().err
    assert cli.main(["train", "exp.yaml", "--resume"]) == 0
    assert "skipping checkpoint-4 is incomplete" in capsys.readouterr().out
    assert adapter_bytes(work) == adapter_bytes(finished)  # the same adapter as the uninterrupted run
    rows = [json.loads(x) for x in (work / RUN / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def _wait_for(predicate, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    """A loralab process whose output goes to a file (a pipe nobody reads would stall it on progress bars)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "loralab", *argv], env=subprocess_env(), stdout=f,
                                stderr=subprocess.STDOUT)


def test_two_trains_at_once(work, tmp_path):
    argv = ["train", "exp.yaml", "--force"]
    first = _start(argv, tmp_path / "first.log")
    _wait_for(lambda: (work / RUN / lock.LOCK_FILE).is_file() or first.poll() is not None)
    second = subprocess.run([sys.executable, "-m", "loralab", *argv], env=subprocess_env(), capture_output=True,
                            text=True, timeout=600)
    assert first.wait(timeout=900) == 0, (tmp_path / "first.log").read_text()
    assert second.returncode == 2
    assert_one_line(second.stderr, f"is in use by `loralab train` (PID {first.pid} on ")
    rows = [json.loads(x) for x in (work / RUN / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert not (work / RUN / lock.LOCK_FILE).exists()


def test_ctrl_c(work, capsys, tmp_path):
    argv = ["train", "exp.yaml", "--force", "--set", "train.max_steps=400", "--set", "train.save_steps=400"]
    metrics = work / RUN / "metrics.jsonl"
    metrics.unlink()  # so the wait below sees this run's first logged step, not the finished run's
    proc = _start(argv, tmp_path / "train.log")
    _wait_for(lambda: proc.poll() is not None or (metrics.is_file() and '"loss"' in metrics.read_text()), 900)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=600)
    err = (tmp_path / "train.log").read_text()
    assert proc.returncode == 130, err
    # Ctrl-C finishes the step, saves a checkpoint and says how to resume (issue 17), in one last line.
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("loralab: interrupted: checkpoint saved at step ") and "--resume" in last, err
    assert "Traceback" not in err, err
    assert _manifest(work)["stages"]["train"]["status"] == "interrupted"
    assert not (work / RUN / lock.LOCK_FILE).exists()
    assert cli.main(["report", "exp.yaml"]) == 2
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
