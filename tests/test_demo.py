"""The offline demo, run once as `loralab demo` does: its bars and its artifacts."""

import csv
import json

import pytest

from loralab import cli
from loralab.runs.readers import format_metric, read_eval_results, read_metrics


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--out", str(out)]) == 0
    return out / "runs" / "demo"


def test_demo_shows_learning(demo_run):
    evals = [r["eval_loss"] for r in read_metrics(demo_run / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1] <= evals[0] / 2, evals
    results = read_eval_results(demo_run / "eval_results.csv")
    assert results["rougeL"]["lora"] - results["rougeL"]["base"] >= 0.2, results


def test_demo_artifacts(demo_run):
    with open(demo_run / "eval_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["metric"] for r in rows][:4] == ["bleu", "rouge1", "rouge2", "rougeL"]
    for png in ("loss_curve.png", "lora_flow.png"):
        data = (demo_run / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(demo_run / "loss_curve.png").shape[0] > 100
    report = (demo_run / "report.md").read_text()
    results = read_eval_results(demo_run / "eval_results.csv")
    for name, cols in results.items():
        if name in ("bleu", "rouge1", "rouge2", "rougeL"):
            assert format_metric(cols["base"]) in report and format_metric(cols["lora"]) in report
    for r in read_metrics(demo_run / "metrics.jsonl"):
        if "loss" in r:
            assert f"{r['loss']:.4f}" in report
    manifest = json.loads((demo_run / "manifest.json").read_text())
    assert f"{manifest['parameters']['trainable']:,}" in report
    assert "What is the capital of Japan?" in (demo_run / "examples.md").read_text()
