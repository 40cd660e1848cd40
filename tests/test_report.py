"""The report stage on a synthetic run directory: what it writes, and that its numbers are the files'."""

import json
import math

import pytest
import yaml
from matplotlib.image import imread

from loralab.config import ExperimentConfig
from loralab.errors import LoralabError
from loralab.runs.readers import (
    eval_loss_rows,
    format_lr,
    format_metric,
    read_eval_results,
    read_metrics,
    training_rows,
)
from loralab.stages.report import build_report, plot_lora_flow, plot_loss_curve, run

CONFIG = {
    "name": "tiny-alpaca",
    "output_dir": "outputs/tiny-alpaca",
    "model": {"name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"},
    "data": {
        "path": "../shared/data/alpaca_en_1k.json",
        "num_examples": 40,
        "eval_size": 8,
        "seed": 0,
        "max_length": 512,
        "template": "auto",
    },
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "train": {
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 8,
        "max_steps": 6,
        "learning_rate": 2e-4,
        "warmup_steps": 2,
        "lr_scheduler_type": "linear",
        "logging_steps": 2,
        "save_steps": 6,
        "seed": 0,
        "precision": "bf16",
    },
    "eval": {"max_new_tokens": 64, "prompts": ["Name a primary colour."]},
}
MANIFEST = {
    "loralab_version": "0.1.0",
    "packages": {"torch": "2.9.0", "transformers": "5.24.0"},
    "device": "cpu",
    "device_name": "x86_64",
    "precision": "bf16",
    "seeds": {"data": 0, "train": 0},
    "data_sha256": "ab" * 32,
    "git_commit": None,
    "parameters": {"trainable": 2_252_800, "total": 1_100_048_384, "trainable_percent": 0.20479},
    "stages": {
        "prepare": {"hash": "h1", "wall_s": 1.25, "finished_at": "2026-11-28T10:00:00"},
        "train": {"hash": "h2", "wall_s": 754.0, "finished_at": "2026-11-28T10:12:34"},
        "eval": {"hash": "h3", "wall_s": 98.5, "finished_at": "2026-11-28T10:14:13"},
    },
}
STATS = {
    "train": {"examples": 32, "tokens": 6400, "trained_tokens": 5248},
    "eval": {"examples": 8, "tokens": 1600, "trained_tokens": 1300},
    "source_records": 999,
    "selected": 40,
    "template": "chat",
    "truncated": 1,
    "dropped": 0,
    "trained_token_fraction": 0.82,
}
TRAIN_ROWS = [
    {"step": 2, "epoch": 0.5, "loss": 2.71828, "grad_norm": 1.4142, "learning_rate": 2e-4, "tokens_per_second": 55.1},
    {"step": 4, "epoch": 1.0, "loss": 2.30259, "grad_norm": 0.9871, "learning_rate": 1.0e-4},
    {"step": 6, "epoch": 1.5, "loss": 1.61803, "grad_norm": 0.7311, "learning_rate": 3.3e-5},
]
EVAL_ROWS = [{"step": 4, "eval_loss": 2.45611}, {"step": 6, "eval_loss": 2.1}]
SUMMARY_ROW = {"train_runtime": 750.2, "train_loss": 2.2129, "step": 6}
EVAL_CSV = """metric,base,lora
bleu,0.0412,0.1234567
rouge1,0.2,0.31
rouge2,0.0555,0.12345
rougeL,0.18,0.2901
perplexity,12.5,8.25
"""
EXAMPLES_MD = """# Before and after

## Name a primary colour.

**Base:** Blue is nice.

**LoRA:** Red.

```python
# a comment, not a heading
```
"""


def write_run_dir(run_dir, *, eval_results=True, examples=True, metrics=True, config=True):
    """A run directory as the prepare, train and eval stages leave it, with small made-up values."""
    (run_dir / "data").mkdir(parents=True)
    if config:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (run_dir / "manifest.json").write_text(json.dumps(MANIFEST))
    (run_dir / "data" / "stats.json").write_text(json.dumps(STATS))
    if metrics:
        rows = [TRAIN_ROWS[0], TRAIN_ROWS[1], EVAL_ROWS[0], TRAIN_ROWS[2], EVAL_ROWS[1], SUMMARY_ROW]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if eval_results:
        (run_dir / "eval_results.csv").write_text(EVAL_CSV)
        predictions = [
            {"prompt": f"p{i}", "reference": "r", "base": "b", "lora": "l", "scores": {"base": {}, "lora": {}}}
            for i in range(8)
        ]
        (run_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    if examples:
        (run_dir / "examples.md").write_text(EXAMPLES_MD)
    return run_dir


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 0
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One complete run directory, reported once and shared by the read-only checks below."""
    run_dir = write_run_dir(tmp_path_factory.mktemp("run"))
    report = build_report(run_dir)
    return run_dir, report, report.read_text()


def test_build_report_writes_report_and_images(full_run):
    run_dir, report, text = full_run
    assert report == run_dir / "report.md"
    assert_png(run_dir / "loss_curve.png")
    assert_png(run_dir / "lora_flow.png")
    assert "](loss_curve.png)" in text and "](lora_flow.png)" in text
    # Atomic writes leave no temporary files behind.
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_report_numbers_are_the_files_numbers(full_run):
    run_dir, _, text = full_run
    assert text.startswith("# tiny-alpaca")
    results = read_eval_results(run_dir / "eval_results.csv")
    assert set(results) == {"bleu", "rouge1", "rouge2", "rougeL", "perplexity"}
    for values in results.values():
        assert f"| {format_metric(values['base'])} | {format_metric(values['lora'])} |" in text
    assert "| BLEU | 0.0412 | 0.1235 | +0.0823 |" in text
    assert "8 held-out prompts" in text

    assert "2,252,800 of 1,100,048,384 (0.20%)" in text
    for row in training_rows(read_metrics(run_dir / "metrics.jsonl")):
        assert f"| {row['step']} | {row['epoch']:.2f} | {format_metric(row['loss'])} |" in text
        assert format_lr(row["learning_rate"]) in text
    assert "| 4 | 2.4561 |" in text  # held-out loss
    assert "mean training loss over the run 2.2129" in text


def test_report_setup_section(full_run):
    _, _, text = full_run
    for expected in [
        "`TinyLlama/TinyLlama-1.1B-Chat-v1.0`",
        "`../shared/data/alpaca_en_1k.json`",
        "32 train / 8 held-out",
        "r = 8, alpha = 16, dropout = 0.05",
        "q_proj, k_proj, v_proj, o_proj",
        "1 x 8 accumulation = 8 examples per optimizer step",
        "2.00e-04, linear schedule, warmup 2 steps",
        "chat template, at most 512 tokens",
        "5,248 of 6,400 train tokens carry loss",
        "cpu (x86_64)",
        "| Precision | bf16 |",
        "| train | 12 min 34 s |",
        "| prepare | 1.2 s |",
    ]:
        assert expected in text, expected


def test_report_includes_examples_and_caveat(full_run):
    _, _, text = full_run
    assert "**LoRA:** Red." in text
    # The examples' own headings sit below the report's sections.
    assert "\n### Before and after\n" in text and "\n#### Name a primary colour.\n" in text
    assert "\n# a comment, not a heading\n" in text
    assert "paraphrase" in text and "correct" in text


def test_missing_optional_files_give_notes(tmp_path):
    run_dir = write_run_dir(tmp_path / "run", eval_results=False, examples=False)
    text = build_report(run_dir).read_text()
    assert "Not available yet: `eval_results.csv` is missing" in text
    assert "Not available yet: `examples.md` is missing" in text
    assert_png(run_dir / "lora_flow.png")
    assert "| 6 | 1.50 | 1.6180 |" in text


@pytest.mark.parametrize(("missing", "stage"), [("metrics", "train"), ("config", "prepare")])
def test_missing_required_file_raises(tmp_path, missing, stage):
    run_dir = write_run_dir(tmp_path / "run", **{missing: False})
    name = {"metrics": "metrics.jsonl", "config": "config.yaml"}[missing]
    expected = rf"{name} not found.*run the {stage} stage first: `loralab {stage} CONFIG`"
    with pytest.raises(FileNotFoundError, match=expected) as err:
        build_report(run_dir)
    # Also a LoralabError, which the CLI prints as one line instead of a traceback.
    assert isinstance(err.value, LoralabError)
    assert not (run_dir / "report.md").exists()


def test_no_training_rows_gives_note(tmp_path):
    run_dir = write_run_dir(tmp_path / "run")
    (run_dir / "metrics.jsonl").write_text(json.dumps(SUMMARY_ROW) + "\n")
    text = build_report(run_dir).read_text()
    assert "No training rows were logged" in text
    assert not (run_dir / "loss_curve.png").exists()


def test_read_metrics_and_row_selection(tmp_path):
    path = tmp_path / "metrics.jsonl"
    resumed = {"step": 4, "epoch": 1.0, "loss": 2.0, "grad_norm": 0.5, "learning_rate": 1e-4}
    path.write_text("\n".join(json.dumps(r) for r in [*TRAIN_ROWS, *EVAL_ROWS, SUMMARY_ROW, resumed]) + "\n\n")
    rows = read_metrics(path)
    assert len(rows) == 7
    # A resumed run logs step 4 again; the later row wins, and steps stay sorted.
    assert [(r["step"], r["loss"]) for r in training_rows(rows)] == [(2, 2.71828), (4, 2.0), (6, 1.61803)]
    assert [r["eval_loss"] for r in eval_loss_rows(rows)] == [2.45611, 2.1]

    path.write_text(json.dumps(TRAIN_ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_read_eval_results(tmp_path):
    path = tmp_path / "eval_results.csv"
    path.write_text("metric,base,lora\nbleu,0.1,0.25\nperplexity,,7.5\n")
    results = read_eval_results(path)
    assert results["bleu"] == {"base": 0.1, "lora": 0.25}
    assert math.isnan(results["perplexity"]["base"]) and results["perplexity"]["lora"] == 7.5
    assert format_metric(results["perplexity"]["base"]) == "n/a"

    path.write_text("name,value\nbleu,0.1\n")
    with pytest.raises(ValueError, match="metric,base,lora"):
        read_eval_results(path)


def test_plots_without_optional_values(tmp_path):
    # Training rows only (no held-out loss, no grad norm), and a flow before the eval stage.
    plot_loss_curve([{"step": 1, "loss": 3.0, "learning_rate": 1e-4}, {"step": 2, "loss": 2.5}], tmp_path / "loss.png")
    assert_png(tmp_path / "loss.png")
    plot_lora_flow({"model": "tiny", "r": 4}, tmp_path / "flow.png")
    assert_png(tmp_path / "flow.png")
    with pytest.raises(ValueError, match="no training rows"):
        plot_loss_curve([{"eval_loss": 1.0, "step": 2}], tmp_path / "empty.png")


def test_run_records_the_report_stage(tmp_path):
    cfg = ExperimentConfig(name="tiny-alpaca", output_dir=str(tmp_path))
    write_run_dir(cfg.run_dir)
    path = run(cfg)
    assert path == cfg.run_dir / "report.md"
    stages = json.loads((cfg.run_dir / "manifest.json").read_text())["stages"]
    assert set(stages) == {"prepare", "train", "eval", "report"} and stages["report"]["wall_s"] > 0
    # A report's own timing is never in the report: at the next build it would be the previous report's.
    assert "| report |" not in build_report(cfg.run_dir).read_text()


def test_a_run_too_short_to_judge_says_so_in_both_reports(tmp_path):
    short = write_run_dir(tmp_path / "short")  # 6 steps logged every 2 (3 points), 8 held-out examples
    text = build_report(short).read_text()
    section = text.split("## Too short to judge\n\n")[1].split("\n## ")[0]
    assert "train.logging_steps 2 logs 3 loss points in train.max_steps 6" in section
    assert "8 held-out examples (data.eval_size)" in section
    assert 'id="too-short"' in (short / "report.html").read_text()
    long_enough = tmp_path / "long"
    write_run_dir(long_enough)
    config = dict(CONFIG, train=dict(CONFIG["train"], max_steps=100, logging_steps=10),
                  data=dict(CONFIG["data"], eval_size=20))
    (long_enough / "config.yaml").write_text(yaml.safe_dump(config))
    assert "Too short to judge" not in build_report(long_enough).read_text()
    assert 'id="too-short"' not in (long_enough / "report.html").read_text()


def test_a_report_before_eval_names_the_command_to_run(tmp_path):
    run = write_run_dir(tmp_path / "run", eval_results=False, examples=False)
    text = build_report(run).read_text()
    results = text.split("## Results\n\n")[1].split("\n## ")[0]
    assert "eval_results.csv" in results and "`loralab eval CONFIG`" in results
    assert "loralab eval CONFIG" in (run / "report.html").read_text().split('id="results"')[1].split("</section>")[0]
