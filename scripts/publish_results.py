"""Copy finished runs' published files under results/NAME/ and print the README's numbers for them.

    python scripts/publish_results.py outputs/smollm2-alpaca results/smollm2-alpaca
    python scripts/publish_results.py outputs/smollm2-alpaca-seed42 outputs/smollm2-alpaca-seed43 \
        outputs/smollm2-alpaca-seed44 results/smollm2-alpaca

One run: its files go into results/NAME/. Several (one config under several seeds, `loralab run --seeds`): each
into results/NAME/seed<S>/, with results/NAME/seeds.md, the mean ± sd table. tests/test_results.py checks that the
README shows exactly these numbers.
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


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python scripts/publish_results.py RUN_DIR [RUN_DIR ...] DEST")
    main([Path(a) for a in sys.argv[1:-1]], Path(sys.argv[-1]))
