"""report.html and `loralab compare` read back with a parser: every number on the page is the files' number,
the page fetches nothing, and the pure building blocks do what they say."""

import csv
import json
import math

import pytest
from html_page import parse_page
from report_runs import EXAMPLES, make_run

from loralab import cli
from loralab.commands.compare import (
    aligned_predictions,
    compare_page,
    differing_fields,
    flatten,
    run_labels,
)
from loralab.reporting.html import change_cell, nice_ticks, tick_labels
from loralab.runs.readers import format_lr, format_metric, read_metrics, read_run, training_rows
from loralab.stages.report import build_report, report_page


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two reported runs that differ in LoRA rank, losses and scores."""
    root = tmp_path_factory.mktemp("runs")
    return make_run(root / "r8", r=8, name="r8"), make_run(root / "r16", r=16, name="r16", shift=0.1, loss_scale=0.9)


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_html_is_written_and_self_contained(runs):
    text = (runs[0] / "report.html").read_text()
    page = parse_page(text)
    # Nothing is fetched: every URL on the page is an embedded image, and no stylesheet or script is linked.
    assert page.urls and all(url.startswith("data:image/png;base64,") for url in page.urls)
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script src" not in text
    assert "default-src 'none'" in text  # the browser refuses any fetch the page might attempt


def test_report_html_metrics_equal_eval_results(runs):
    page = parse_page((runs[0] / "report.html").read_text())
    table = page.tables["metrics"]
    assert [c["text"] for c in table["header"][0]] == ["Metric", "Base", "LoRA", "Change"]
    expected = csv_rows(runs[0] / "eval_results.csv")
    assert len(table["rows"]) == len(expected)
    for row, want in zip(table["rows"], expected, strict=False):
        base, lora = float(want["base"]), float(want["lora"])
        assert [row[1]["value"], row[2]["value"]] == [base, lora]  # exactly the file's values
        assert [row[1]["text"], row[2]["text"]] == [format_metric(base), format_metric(lora)]
        assert row[3]["value"] == lora - base and row[3]["text"] == f"{lora - base:+.4f}"
    labels = [row[0]["text"] for row in table["rows"]]
    assert labels == ["BLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L", "Perplexity (lower is better)"]


def test_report_html_change_colours_follow_the_metric_direction(runs):
    text = (runs[0] / "report.html").read_text()
    # ROUGE-L rose (a gain: green), perplexity fell (lower is better: also a gain).
    assert f'<td data-value="{0.2901 - 0.18!r}" class="num up">+0.1101</td>' in text
    assert '<td data-value="-4.25" class="num up">-4.2500</td>' in text
    assert change_cell(1.0, 2.0).cls == "num up" and change_cell(1.0, 2.0, lower_is_better=True).cls == "num down"
    assert change_cell(1.0, 1.0).cls == "num" and change_cell(math.nan, 1.0).text == "n/a"


def test_report_html_curves_are_the_metrics_file(runs):
    page = parse_page((runs[0] / "report.html").read_text())
    rows = read_metrics(runs[0] / "metrics.jsonl")
    train = training_rows(rows)
    loss = {s["name"]: s["points"] for s in page.charts["chart-loss"]}
    assert loss["training loss"] == [[r["step"], r["loss"]] for r in train]
    assert loss["held-out loss"] == [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r]
    assert page.charts["chart-grad-norm"][0]["points"] == [[r["step"], r["grad_norm"]] for r in train]
    assert page.charts["chart-lr"][0]["points"] == [[r["step"], r["learning_rate"]] for r in train]
    # The hover readout at step 4 shows both losses, formatted as the report formats them.
    step4 = next(h for h in page.hover["chart-loss"] if h["lines"][0] == "step 4")
    assert step4["lines"] == ["step 4", f"training loss: {format_metric(2.30259)}",
                              f"held-out loss: {format_metric(2.45611)}"]
    assert page.hover["chart-lr"][0]["lines"] == ["step 2", f"learning rate: {format_lr(2e-4)}"]


def test_report_html_lists_every_held_out_prompt(runs):
    page = parse_page((runs[0] / "report.html").read_text())
    table = page.tables["predictions"]
    assert [c["text"] for c in table["header"][0]] == [
        "#", "Prompt", "Reference", "Base answer", "LoRA answer", "ROUGE-L base", "ROUGE-L LoRA", "Change",
    ]
    assert [c["sort"] for c in table["header"][0]] == ["0", None, None, None, None, "5", "6", "7"]
    predictions = read_metrics(runs[0] / "predictions.jsonl")
    assert len(table["rows"]) == len(predictions) == len(EXAMPLES)
    for row, p in zip(table["rows"], predictions, strict=False):
        prompt = p["instruction"] + (f"\n\n{p['input']}" if p["input"] else "")
        assert [c["text"] for c in row[1:5]] == [prompt, p["reference"], p["base"], p["lora"]]
        base, lora = p["scores"]["base"]["rougeL"], p["scores"]["lora"]["rougeL"]
        assert [row[5]["value"], row[6]["value"], row[7]["value"]] == [base, lora, lora - base]
    text = (runs[0] / "report.html").read_text()
    assert "LoRA is higher than the base model on 4 of 6 held-out prompts, lower on 1, equal on 1." in text
    assert "Write a haiku &lt;about&gt; the sea &amp; sky." in text  # answers are escaped, never markup


def test_report_html_follows_the_files(tmp_path):
    # Change the files and rebuild: the page changes with them, so its numbers are read, not fixed.
    run_dir = make_run(tmp_path / "run")
    path = run_dir / "eval_results.csv"
    path.write_text(path.read_text().replace("rougeL,0.18,0.2901", "rougeL,0.5,0.25"))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics[0]["loss"] = 9.87654
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    build_report(run_dir)
    page = parse_page((run_dir / "report.html").read_text())
    rouge = next(r for r in page.tables["metrics"]["rows"] if r[0]["text"] == "ROUGE-L")
    assert [c["text"] for c in rouge] == ["ROUGE-L", "0.5000", "0.2500", "-0.2500"]
    assert page.charts["chart-loss"][0]["points"][0] == [2, 9.87654]


def test_report_html_without_eval_or_training_rows(tmp_path):
    run_dir = make_run(tmp_path / "run")
    for name in ("eval_results.csv", "predictions.jsonl", "examples.md"):
        (run_dir / name).unlink()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"train_runtime": 1.0, "train_loss": 2.0}) + "\n")
    text = report_page(read_run(run_dir), None)
    assert "Not available yet: `eval_results.csv` is missing" not in text  # Markdown is rendered
    assert "Not available yet: <code>eval_results.csv</code> is missing" in text
    assert "No training rows were logged" in text and "<svg" not in text


def test_compare_page(runs, tmp_path):
    out = tmp_path / "compare.html"
    assert cli.main(["compare", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    page = parse_page(out.read_text())
    assert all(url.startswith("data:") for url in page.urls) and "https://" not in out.read_text()

    diff = {row[0]["text"]: [c["text"] for c in row[1:]] for row in page.tables["config-diff"]["rows"]}
    assert diff == {"name": ["r8", "r16"], "lora.r": ["8", "16"], "lora.lora_alpha": ["16", "32"]}

    metrics = page.tables["metrics"]
    assert [c["text"] for c in metrics["header"][0]] == ["Metric", "r8", "r16"]
    for col, run_dir in enumerate(runs, start=1):
        for row, want in zip(metrics["rows"], csv_rows(run_dir / "eval_results.csv"), strict=False):
            assert row[col]["value"] == float(want["lora"])
            assert row[col]["text"].startswith(format_metric(float(want["lora"])) + "\nbase "
                                               + format_metric(float(want["base"])))

    series = {s["name"]: s["points"] for s in page.charts["chart-loss"]}
    for label, run_dir in zip(("r8", "r16"), runs, strict=False):
        assert series[f"{label} training"] == [[r["step"], r["loss"]]
                                               for r in training_rows(read_metrics(run_dir / "metrics.jsonl"))]
    assert [s["name"] for s in page.charts["chart-lr"]] == ["r8", "r16"]

    answers = page.tables["predictions"]
    assert [c["text"] for c in answers["header"][0]][3:] == [
        "Base answer (r8)", "LoRA answer: r8", "ROUGE-L: r8", "LoRA answer: r16", "ROUGE-L: r16",
        "ROUGE-L r16 minus r8",
    ]
    assert len(answers["rows"]) == len(EXAMPLES)
    first = answers["rows"][0]
    assert [first[4]["text"], first[6]["text"]] == ["Red is a primary colour.", "Red is a primary colour. (r16)"]
    assert [first[5]["value"], first[7]["value"], first[8]["value"]] == [1.0, 1.0, 0.0]
    assert answers["rows"][2][8]["value"] == pytest.approx(0.1)


def test_compare_cli_errors(runs, tmp_path, capsys):
    out = tmp_path / "c.html"
    assert cli.main(["compare", str(runs[0]), "--out", str(out)]) == 2
    assert "at least two run directories" in capsys.readouterr().err
    assert cli.main(["compare", str(runs[0]), str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope is not a directory" in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["compare", str(runs[0]), str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    assert not out.exists()


def test_flatten_and_differing_fields():
    a = {"name": "a", "lora": {"r": 8, "target_modules": ["q", "v"]}, "train": {"lr": 1e-4}}
    b = {"name": "a", "lora": {"r": 16, "target_modules": ["q", "v"]}, "train": {}, "extra": None}
    assert flatten(a) == {"name": "a", "lora.r": 8, "lora.target_modules": ["q", "v"], "train.lr": 1e-4}
    assert differing_fields([a, b]) == [("lora.r", [8, 16]), ("train.lr", [1e-4, "(not set)"]),
                                        ("train", ["(not set)", {}]), ("extra", ["(not set)", None])]
    assert differing_fields([a, a]) == []


def test_run_labels_and_alignment(runs):
    one, two = read_run(runs[0]), read_run(runs[1])
    assert run_labels([one, two]) == ["r8", "r16"] and run_labels([one, one]) == ["r8 (1)", "r8 (2)"]
    two.predictions = two.predictions[1:] + [{"instruction": "only here", "reference": "x", "lora": "y"}]
    aligned = aligned_predictions([one, two])
    assert len(aligned) == len(EXAMPLES) + 1
    assert aligned[0][1][1] is None and aligned[-1][1][0] is None and aligned[-1][0]["instruction"] == "only here"
    text = compare_page([one, two])
    assert "(not set)" in text
    # The same prompt and reference twice (a data set can repeat a record): both kept, matched in order.
    one.predictions = one.predictions + one.predictions[:1]
    two.predictions = one.predictions
    aligned = aligned_predictions([one, two])
    assert len(aligned) == len(EXAMPLES) + 1 and aligned[-1][1] == [one.predictions[-1], one.predictions[-1]]


def test_nice_ticks_and_labels():
    assert nice_ticks(0, 60, 6) == [0, 20, 40, 60]
    assert nice_ticks(1.61803, 2.71828, 5) == [1.5, 2.0, 2.5, 3.0]
    assert nice_ticks(0, 0.002, 5) == [0.0, 0.0005, 0.001, 0.0015, 0.002]
    assert nice_ticks(3.0, 3.0)[0] < 3.0 < nice_ticks(3.0, 3.0)[-1]  # a flat line still gets an axis
    assert tick_labels([0.0, 0.0005, 0.001]) == ["0", "5.0e-04", "1.0e-03"]
    assert tick_labels([1.6, 1.8, 2.0]) == ["1.6", "1.8", "2.0"]
    assert tick_labels([0, 20, 40]) == ["0", "20", "40"]
