"""Copy finished runs' published files under results/NAME/ and print the README's numbers for them.

    python scripts/publish_results.py outputs/smollm2-alpaca results/smollm2-alpaca
    python scripts/publish_results.py outputs/smollm2-alpaca-seed42 outputs/smollm2-alpaca-seed43 \
        outputs/smollm2-alpaca-seed44 results/smollm2-alpaca

One run: its files go into results/NAME/. Several (one config under several seeds, `loralab run --seeds`): each
into results/NAME/seed<S>/, with results/NAME/seeds.md, the mean ± sd table. tests/test_results.py checks that the
README shows exactly these numbers. A sweep (`loralab sweep`, one seed per cell): its page and spec, and each
cell's files into results/NAME/<cell>/:

    python scripts/publish_results.py --sweep outputs/smollm2-200steps-sweep results/smollm2-r-sweep
"""

import json
import shutil
import sys
from pathlib import Path

import yaml

from loralab.files import atomic_write_text
from loralab.reporting.seeds import seeds_markdown, seeds_table
from loralab.runs.readers import read_eval_results, read_published_summary
from loralab.runs.results import metric_table, speed_table, summary_lines

FILES = ("eval_results.csv", "examples.md", "loss_curve.png", "manifest.json", "metrics.jsonl", "config.yaml",
         "data/stats.json")


def copy_run(run_dir: Path, dest: Path) -> dict:
    """Copy one finished run's FILES into ``dest``; return its run_summary."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    if "report" not in manifest.get("stages", {}):
        sys.exit(f"{run_dir} has not finished (no report stage in manifest.json)")
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(run_dir / name, dest / Path(name).name)
    return read_published_summary(dest)


def main(run_dirs: list[Path], dest: Path) -> None:
    if len(run_dirs) == 1:
        summary = copy_run(run_dirs[0], dest)
        print(metric_table((dest / "eval_results.csv").read_text()))
        print()
        print("\n".join(summary_lines(summary)))
        return
    seeds, summaries = [], []
    for run_dir in run_dirs:
        seed = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"]
        summaries.append(copy_run(run_dir, dest / f"seed{seed}"))
        seeds.append(seed)
    runs = [(s, read_eval_results(dest / f"seed{s}" / "eval_results.csv")) for s in seeds]
    name = yaml.safe_load((run_dirs[0] / "config.yaml").read_text())["name"].rsplit("-seed", 1)[0]
    atomic_write_text(dest / "seeds.md", seeds_markdown(name, runs))
    print(seeds_table(runs))
    print()
    print(speed_table(seeds, summaries))


def publish_sweep(sweep_dir: Path, dest: Path) -> None:
    """The sweep's page and spec, and each cell's files (one run per cell) in dest/<cell>/; prints each cell's
    held-out loss and ROUGE-L with their change and interval."""
    spec = json.loads((sweep_dir / "sweep.json").read_text())
    # the run directories as sweep.json names them: relative to where the sweep ran (run this from there)
    unfinished = [c["label"] for c in spec["cells"] for d in c["run_dirs"] if not (Path(d) / "report.md").is_file()]
    if unfinished:
        sys.exit(f"cells not finished (or not found from here): {', '.join(unfinished)}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("sweep.html", "sweep.json"):
        shutil.copyfile(sweep_dir / name, dest / name)
    for cell in spec["cells"]:
        if len(cell["run_dirs"]) != 1:
            sys.exit("publish a sweep of one seed per cell (or publish each cell's seeds as runs)")
        summary = copy_run(Path(cell["run_dirs"][0]), dest / cell["label"])
        results = read_eval_results(dest / cell["label"] / "eval_results.csv")
        for metric in ("eval_loss", "rougeL"):
            r = results[metric]
            print(f"{cell['label']} {metric}: {r['base']:.4f} -> {r['lora']:.4f}, change {r['change']:+.4f} "
                  f"[{r['change_low']:+.4f}, {r['change_high']:+.4f}]")
        print(f"{cell['label']}: train {summary['wall_s']['train'] / 60:.1f} min, "
              f"{summary['tokens_per_s']:.1f} tokens/s")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--sweep":
        publish_sweep(Path(sys.argv[2]), Path(sys.argv[3]))
    elif len(sys.argv) < 3:
        sys.exit("usage: python scripts/publish_results.py RUN_DIR [RUN_DIR ...] DEST  (or --sweep SWEEP_DIR DEST)")
    else:
        main([Path(a) for a in sys.argv[1:-1]], Path(sys.argv[-1]))
