"""`loralab run CONFIG --seeds N`: the same config under N seeds in sibling run directories that share prepare,
summarised as mean ± sd over the seeds beside each seed's value."""

from __future__ import annotations

import statistics

import yaml
from conftest import write_config

from loralab import cli
from loralab.runs.readers import read_eval_results


def test_seeds_train_in_sibling_runs_that_share_prepare_and_are_summarised(tmp_path, tiny_model_dir, alpaca_path,
                                                                          capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "exp.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": str(alpaca_path)}, eval={"max_new_tokens": 4, "num_examples": 4})
    assert cli.main(["run", str(cfg), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    runs = sorted(p for p in (tmp_path / "runs").glob("t-seed*") if p.is_dir())
    assert [r.name for r in runs] == ["t-seed42", "t-seed43"]
    assert [yaml.safe_load((r / "config.yaml").read_text())["train"]["seed"] for r in runs] == [42, 43]
    assert out.count("prepare: shared from") == 1  # the second seed takes the first one's split
    assert (runs[0] / "data/train.jsonl").read_bytes() == (runs[1] / "data/train.jsonl").read_bytes()
    adapters = [(r / "adapter/adapter_model.safetensors").read_bytes() for r in runs]
    assert adapters[0] != adapters[1]  # another seed, another LoRA initialisation and dropout
    summary = (tmp_path / "runs" / "t-seeds.md").read_text()
    results = [read_eval_results(r / "eval_results.csv") for r in runs]
    changes = [r["eval_loss"]["lora"] - r["eval_loss"]["base"] for r in results]
    assert changes[0] != changes[1]  # the seeds trained differently: a real spread
    row = next(line for line in summary.splitlines() if line.startswith("| Held-out loss"))
    assert f"{statistics.fmean(changes):+.4f} ± {statistics.stdev(changes):.4f}" in row
    assert all(f"{c:+.4f} [{r['eval_loss']['change_low']:+.4f}, {r['eval_loss']['change_high']:+.4f}]" in row
               for c, r in zip(changes, results, strict=True))  # each seed's change with its interval
    assert cli.main(["run", str(cfg), "--seeds", "0"]) == 2
    assert "--seeds 0: give 1 or more seeds" in capsys.readouterr().err
    # train.seeds in the config asks for the same runs: both seeds up to date, nothing trained again
    assert cli.main(["run", str(cfg), "--set", "train.seeds=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("train: up to date") == 2 and "run: 2 seeds done" in out
    assert cli.main(["run", str(cfg), "--set", "train.seeds=0"]) == 2
    assert "config key 'train.seeds' must be positive, got 0" in capsys.readouterr().err
