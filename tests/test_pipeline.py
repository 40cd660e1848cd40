"""End to end on a tiny local Llama and the real Alpaca records: the CLI, the run directory, the stages."""

import json
import math

import pytest
import torch
from conftest import write_config

from loralab import cli
from loralab.files import read_jsonl
from loralab.intervals import loss_changes
from loralab.runs.readers import format_metric, read_eval_results, read_metrics


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, alpaca_path):
    """One full `loralab run` shared by the tests below; returns (config path, run dir)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = write_config(tmp / "exp.yaml", model={"name_or_path": str(tiny_model_dir)}, data={"path": str(alpaca_path)})
    assert cli.main(["run", str(cfg)]) == 0
    return cfg, tmp / "runs" / "t"


def test_run_directory_layout(run):
    _, rd = run
    for rel in [
        "config.yaml", "manifest.json", "data/train.jsonl", "data/eval.jsonl", "data/stats.json",
        "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl",
        "eval_results.csv", "predictions.jsonl", "examples.md", "loss_curve.png", "lora_flow.png", "report.md",
    ]:
        assert (rd / rel).is_file(), rel
    manifest = json.loads((rd / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"prepare", "train", "eval", "report"}
    assert manifest["precision"] in ("bf16", "fp32") and manifest["device"] == "cpu"
    assert manifest["parameters"]["trainable"] > 0 and manifest["packages"]["torch"] == torch.__version__
    stats = json.loads((rd / "data/stats.json").read_text())
    assert stats["train"]["examples"] + stats["eval"]["examples"] + stats["dropped"] == 48


def test_metrics_log_has_every_logged_step(run):
    _, rd = run
    rows = read_metrics(rd / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for r in train_rows:
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["learning_rate"] >= 0 and r["epoch"] > 0
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4]


def test_tensorboard_event_file_holds_what_metrics_jsonl_holds(run):
    """The Trainer's TensorBoard integration writes into <run>/tensorboard/ by default: read it back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, rd = run
    events = EventAccumulator(str(rd / "tensorboard"))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    rows = read_metrics(rd / "metrics.jsonl")
    for key, tag in [("loss", "train/loss"), ("grad_norm", "train/grad_norm"),
                     ("learning_rate", "train/learning_rate")]:
        assert scalars[tag] == pytest.approx({r["step"]: r[key] for r in rows if "loss" in r}, rel=1e-6), tag
    assert scalars["eval/loss"] == pytest.approx({r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r},
                                                 rel=1e-6)
    assert sorted(scalars["eval/loss"]) == [0, 4]


def test_adapter_loads_with_plain_peft_and_was_trained(run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, rd = run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(rd / "adapter"))
    after = model(ids).logits
    assert not torch.allclose(before, after)


def test_eval_results_and_report_agree(run):
    _, rd = run
    results = read_eval_results(rd / "eval_results.csv")
    assert {"bleu", "rouge1", "rouge2", "rougeL", "perplexity"} <= set(results)
    for cols in results.values():  # every metric, the held-out loss and perplexity too, carries its 95% interval
        assert {"base", "lora", "change", "change_low"} <= set(cols)
        assert cols["change_low"] <= cols["change"] <= cols["change_high"]
        assert cols["lora_better"] + cols["lora_worse"] + cols["tied"] == pytest.approx(1.0, abs=2e-4)
    report = (rd / "report.md").read_text()
    for name in ("bleu", "rouge1", "rouge2", "rougeL"):
        assert format_metric(results[name]["base"]) in report and format_metric(results[name]["lora"]) in report
    for r in read_metrics(rd / "metrics.jsonl"):
        if "loss" in r:
            assert f"{r['loss']:.4f}" in report
    preds = [json.loads(l) for l in (rd / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and {"prompt", "reference", "base", "lora", "scores"} <= set(preds[0])
    assert "Give 3 tips for studying effectively." in (rd / "examples.md").read_text()


def test_unchanged_stages_are_skipped(run, capsys):
    cfg, rd = run
    before = (rd / "adapter/adapter_model.safetensors").stat().st_mtime_ns
    assert cli.main(["run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "prepare: up to date" in out and "train: up to date" in out and "eval: up to date" in out
    assert (rd / "adapter/adapter_model.safetensors").stat().st_mtime_ns == before


def test_changed_config_is_never_mixed_with_old_outputs(run, capsys):
    cfg, rd = run
    # A new LoRA rank makes the adapter stale: eval must refuse it, not score the old adapter.
    assert cli.main(["eval", str(cfg), "--set", "lora.r=4"]) == 2
    err = capsys.readouterr().err
    assert "'train' outputs" in err and "different config" in err
    # A new data seed makes the prepared data stale for train.
    assert cli.main(["train", str(cfg), "--set", "data.seed=7"]) == 2
    assert "'prepare' outputs" in capsys.readouterr().err


def test_resume_continues_from_the_newest_checkpoint(tmp_path, tiny_model_dir, alpaca_path, capsys):
    cfg = write_config(tmp_path / "exp.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": str(alpaca_path)})
    assert cli.main(["prepare", str(cfg)]) == 0
    assert cli.main(["train", str(cfg), "--set", "train.max_steps=2"]) == 0  # leaves checkpoint-2
    rd = tmp_path / "runs" / "t"
    assert (rd / "checkpoints/checkpoint-2").is_dir()
    # The stage hash covers max_steps, so resume with the same config as the checkpoints.
    assert cli.main(["train", str(cfg), "--resume", "--set", "train.max_steps=2"]) == 0
    assert cli.main(["train", str(cfg), "--resume"]) == 2
    assert "different config" in capsys.readouterr().err


def test_base_generations_come_from_the_cache_on_a_rerun(run, capsys):
    cfg, rd = run
    before = (rd / "predictions.jsonl").read_text()
    assert cli.main(["eval", str(cfg), "--force"]) == 0
    out = capsys.readouterr().out
    assert "base generations reused from the cache" in out and "base held-out loss reused from the cache" in out
    assert (rd / "predictions.jsonl").read_text() == before  # greedy and cached: the same answers


def test_eval_reuses_the_held_out_losses_training_measured(run):
    """Training logs the held-out loss at step 0 (LoRA's B is zero: the base model) and at its last step; eval
    scores the same examples, so it takes those instead of a second forward pass over them."""
    _, rd = run
    losses = {r["step"]: r["eval_loss"] for r in read_metrics(rd / "metrics.jsonl") if "eval_loss" in r}
    results = read_eval_results(rd / "eval_results.csv")
    assert results["eval_loss"]["base"] == pytest.approx(losses[0], abs=1e-6)
    assert results["eval_loss"]["lora"] == pytest.approx(losses[4], abs=1e-6)
    assert results["eval_loss"]["lora"] < results["eval_loss"]["base"]
    # with the interval, from the per-example losses training logged at those two steps (and no others)
    per_example = {r["step"]: r["eval_example_losses"] for r in read_metrics(rd / "metrics.jsonl")
                   if "eval_example_losses" in r}
    assert sorted(per_example) == [0, 4] and len(per_example[0]) == len(read_jsonl(rd / "data" / "eval.jsonl"))
    expected = loss_changes(per_example[0], per_example[4])["eval_loss"]
    assert results["eval_loss"]["change_low"] == pytest.approx(expected.low, abs=1e-6)
    assert results["eval_loss"]["change_high"] == pytest.approx(expected.high, abs=1e-6)
    ppl = results["perplexity"]
    assert ppl["change_low"] <= ppl["change"] <= ppl["change_high"]


def test_eval_of_a_subset_measures_its_own_held_out_losses(run, capsys):
    cfg, rd = run
    overrides = ["--set", "eval.num_examples=3", "--set", "eval.cache_base_generations=false"]
    assert cli.main(["eval", str(cfg), *overrides]) == 0
    out, err = capsys.readouterr()
    assert "eval: base held-out loss" in err and "eval: LoRA held-out loss" in err  # the progress bars
    # the answer bars count 3 + 1 prompts: the summary says what the 4 are
    assert "eval: 3 held-out prompts (and 1 before/after prompt: examples.md); ROUGE-L" in out
    results = read_eval_results(rd / "eval_results.csv")
    losses = {r["step"]: r["eval_loss"] for r in read_metrics(rd / "metrics.jsonl") if "eval_loss" in r}
    assert results["eval_loss"]["base"] != pytest.approx(losses[0], abs=1e-6)
    assert math.isfinite(results["eval_loss"]["lora"])
