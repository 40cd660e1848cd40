"""`loralab sweep`: a grid of runs, checked before anything runs, resumable after a kill, sharing prepare and the base
model's cache, summarised on one page; and `loralab plan --grid`, its predicted time."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import yaml
from conftest import subprocess_env, write_config

from loralab import cli
from loralab.commands import plan as plan_command
from loralab.config import ConfigError
from loralab.grid import grid_cells, parse_axis, parse_grid, plan_sweep, split_values
from loralab.planning.measure import resolve_profile
from loralab.runs import lock
from loralab.runs.readers import read_eval_results


def test_grid_values_split_on_commas_outside_brackets_and_read_as_yaml():
    assert split_values("4, 8,16") == ["4", "8", "16"]
    assert split_values("[q_proj,v_proj],[q_proj]") == ["[q_proj,v_proj]", "[q_proj]"]
    axis = parse_axis("train.learning_rate=1e-4,2.0e-4")
    assert axis.key == "train.learning_rate" and axis.texts == ("1e-4", "2.0e-4") and axis.values[1] == 2.0e-4
    assert parse_axis("lora.target_modules=[q_proj,v_proj],[q_proj]").values == (["q_proj", "v_proj"], ["q_proj"])


@pytest.mark.parametrize(("grid", "message"), [
    (["lora.r"], "--grid expects section.key=value1,value2"),
    (["lora.r="], "--grid lora.r= lists no values"),
    (["lora.r=4,4"], "a value is listed twice"),
    (["name=a,b"], "the sweep names and places its runs itself"),
    (["train.seeds=1,3"], "give the runs per cell with --seeds N"),
    (["lora.r=4", "lora.r=8"], "--grid lora.r is given twice"),
    ([], "needs at least one --grid"),
])
def test_a_malformed_grid_is_refused(grid, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(grid)


def test_cells_are_the_product_in_order_with_folder_safe_labels():
    cells = grid_cells(parse_grid(["lora.r=4,8", "train.learning_rate=1e-4,2e-4", "lora.target_modules=[q_proj]"]))
    assert [c.label for c in cells] == [
        "r4-learning_rate1e-4-target_modulesq_proj", "r4-learning_rate2e-4-target_modulesq_proj",
        "r8-learning_rate1e-4-target_modulesq_proj", "r8-learning_rate2e-4-target_modulesq_proj"]
    assert cells[1].overrides == ["lora.r=4", "train.learning_rate=2e-4", "lora.target_modules=[q_proj]"]


@pytest.fixture
def sweep_config(tmp_path, tiny_model_dir, alpaca_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return write_config(tmp_path / "exp.yaml", model={"name_or_path": str(tiny_model_dir)},
                        data={"path": str(alpaca_path)}, eval={"max_new_tokens": 4, "num_examples": 4},
                        train={"max_steps": 4, "save_steps": 2, "logging_steps": 1, "warmup_steps": 1,
                               "gradient_accumulation_steps": 2, "device": "cpu", "seeds": 2})


def test_plan_sweep_builds_every_cell_and_takes_seeds_from_the_config(sweep_config):
    sweep = plan_sweep(sweep_config, ["lora.r=4,8", "train.learning_rate=1e-4,2e-4"])
    assert [c.config.name for c in sweep.cells] == ["t-r4-learning_rate1e-4", "t-r4-learning_rate2e-4",
                                                    "t-r8-learning_rate1e-4", "t-r8-learning_rate2e-4"]
    assert [(c.config.lora.r, c.config.train.learning_rate) for c in sweep.cells] == [
        (4, 1e-4), (4, 2e-4), (8, 1e-4), (8, 2e-4)]
    assert sweep.runs == 8 and [c.name for c in sweep.cells[3].run_configs] == [
        "t-r8-learning_rate2e-4-seed42", "t-r8-learning_rate2e-4-seed43"]
    assert plan_sweep(sweep_config, ["lora.r=4,8"], seeds=1).runs == 2  # --seeds overrides train.seeds


@pytest.mark.parametrize(("grid", "message"), [
    ("train.learning_rate=1e-4,0.0001", "are the same config; list each value once"),
    ("model.revision=a/b,a_b", "are the same run directory; list each value once"),
])
def test_cells_that_would_collide_are_refused(sweep_config, grid, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(sweep_config, [grid])


def test_a_failed_cell_is_said_and_the_sweep_goes_on(sweep_config, tmp_path, capsys, monkeypatch):
    from loralab.errors import LoralabError
    from loralab.stages import pipeline

    real = pipeline.run_all

    def diverge_r4(cfg, **kwargs):
        if cfg.name.endswith("-r4"):
            raise LoralabError("training stopped at step 3: the loss is NaN or infinite")
        return real(cfg, **kwargs)

    monkeypatch.setattr(pipeline, "run_all", diverge_r4)
    assert cli.main(["sweep", str(sweep_config), "--grid", "lora.r=4,8", "--seeds", "1"]) == 2
    captured = capsys.readouterr()
    assert "sweep: cell 1 (lora.r=4) failed: training stopped at step 3" in captured.out
    last = captured.err.strip().splitlines()[-1]  # after the training's progress bars: the one error line
    assert last.startswith("loralab: error: 1 cell(s) of the sweep failed (lora.r=4)"), captured.err
    assert (tmp_path / "runs" / "t-r8" / "eval_results.csv").is_file()  # the next cell ran
    page = (tmp_path / "runs" / "t-sweep" / "sweep.html").read_text()
    assert "1 of 2 cells finished" in page


@pytest.mark.parametrize(("grid", "message"), [
    ("lora.rr=4,8", "unknown config key 'lora.rr'"),
    ("lora.r=4,x", "--grid cell lora.r=x: config key 'lora.r' must be an integer, got 'x'"),
    ("lora.r=", "--grid lora.r= lists no values"),
])
def test_a_bad_grid_is_one_line_and_nothing_runs(sweep_config, tmp_path, capsys, grid, message):
    assert cli.main(["sweep", str(sweep_config), "--grid", grid]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loralab: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()  # nothing made, not even the sweep's folder


def test_plan_on_a_grid_prints_each_cell_and_the_total(sweep_config, capsys):
    total = plan_command.run_sweep(str(sweep_config), ["lora.r=4,8"], [], None, device="cpu")
    out = capsys.readouterr().out
    profile = resolve_profile("cpu", False)
    cells = plan_sweep(sweep_config, ["lora.r=4,8"]).cells
    per_run = [plan_command.plan_config(c.config, profile)[0].run_seconds for c in cells]
    assert total == pytest.approx(2 * sum(per_run))  # 2 seeds (train.seeds) per cell, none run yet
    assert "2 cells x 2 seed(s) = 4 runs" in out and "lora.r=4: peak" in out and "lora.r=8: peak" in out
    assert f"total: {plan_command._fmt_seconds(total)} of training" in out
    assert cli.main(["plan", str(sweep_config), "--grid", "lora.r=4,8", "--device", "cpu"]) == 0
    assert "total: " in capsys.readouterr().out
    assert cli.main(["plan", str(sweep_config), "--device", "cpu"]) == 0  # no grid: one run, x train.seeds
    assert f"2 seeds: {plan_command._fmt_seconds(2 * per_run[1])} of training in all" in capsys.readouterr().out


# The sweep in a real process, killed (SIGKILL) in the second cell's fourth step, its step-2 checkpoint complete.
KILL_IN_SECOND_CELL = """
import os, signal, sys
import transformers
from loralab import cli
real = transformers.Trainer.training_step
def step_then_die(self, *args, **kwargs):
    if "-r8" in self.args.output_dir and self.state.global_step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)
transformers.Trainer.training_step = step_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_killed_sweep_reruns_only_what_is_missing(sweep_config, tmp_path, capsys):
    argv = ["sweep", str(sweep_config), "--grid", "lora.r=4,8", "--seeds", "1"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_CELL, *argv], env=subprocess_env(), stdout=log,
                              stderr=subprocess.STDOUT, timeout=900)
    killed = (tmp_path / "killed.log").read_text()
    assert proc.returncode == -signal.SIGKILL, killed
    runs = tmp_path / "runs"
    first, second = runs / "t-r4", runs / "t-r8"
    assert (first / "eval_results.csv").is_file() and not (second / "eval_results.csv").exists()
    assert (second / "checkpoints" / "checkpoint-2").is_dir()
    first_files = {p.name: p.stat().st_mtime_ns for p in (first / "adapter").iterdir()}

    assert cli.main(argv) == 0  # the lock the killed process left is taken over
    out = capsys.readouterr().out
    cell_one, cell_two = out.split("sweep: cell 2 of 2")
    assert "train: up to date" in cell_one and "eval: up to date" in cell_one  # the finished cell: skipped
    assert "train: resuming from step 2" in cell_two and "prepare: shared from" not in cell_two  # already shared
    assert {p.name: p.stat().st_mtime_ns for p in (first / "adapter").iterdir()} == first_files
    rows = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # each step logged once across both processes
    assert (first / "data/train.jsonl").read_bytes() == (second / "data/train.jsonl").read_bytes()
    page = (runs / "t-sweep" / "sweep.html").read_text()
    assert "2 of 2 cells finished" in page and "Best by held-out loss" in page
    spec = json.loads((runs / "t-sweep" / "sweep.json").read_text())
    assert [c["run_dirs"] for c in spec["cells"]] == [[str(first)], [str(second)]]
    for cell in (first, second):
        results = read_eval_results(cell / "eval_results.csv")
        assert f'data-value="{results["eval_loss"]["lora"]!r}"' in page
    assert "eval: base generations reused from the cache" in cell_two  # the base model's work is shared
    assert not (runs / "t-sweep" / lock.LOCK_FILE).exists()


def test_a_sweep_in_progress_holds_its_lock(sweep_config, tmp_path, capsys):
    with lock.run_lock(tmp_path / "runs" / "t-sweep", "sweep"):
        assert cli.main(["sweep", str(sweep_config), "--grid", "lora.r=4,8"]) == 2
    err = capsys.readouterr().err
    assert "is in use by `loralab sweep`" in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs" / "t-r4-seed42").exists()


def test_train_seeds_in_the_config_leaves_every_stage_hash_alone(sweep_config):
    from loralab.config import load_config
    from loralab.runs.fingerprints import stage_keys

    one, two = (load_config(sweep_config, [f"train.seeds={n}"], warn=False) for n in (1, 2))
    assert stage_keys(one) == stage_keys(two)
    assert yaml.safe_load(sweep_config.read_text())["train"]["seeds"] == 2
