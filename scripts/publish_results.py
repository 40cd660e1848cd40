"""Copy a finished run's published files under results/NAME/ and print the README numbers for them.

    python scripts/publish_results.py outputs/smollm2-alpaca results/smollm2-alpaca

tests/test_results.py checks that the README shows exactly these numbers.
"""

import json
import shutil
import sys
from pathlib import Path

from loralab.files import read_jsonl
from loralab.runs.results import metric_table, run_summary, summary_lines

FILES = ("eval_results.csv", "examples.md", "loss_curve.png", "manifest.json", "metrics.jsonl", "config.yaml",
         "data/stats.json")


def main(run_dir: Path, dest: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    if "report" not in manifest.get("stages", {}):
        sys.exit(f"{run_dir} has not finished (no report stage in manifest.json)")
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(run_dir / name, dest / Path(name).name)
    stats = json.loads((dest / "stats.json").read_text())
    config = __import__("yaml").safe_load((dest / "config.yaml").read_text())
    per_step = config["train"]["per_device_train_batch_size"] * config["train"]["gradient_accumulation_steps"]
    summary = run_summary(manifest, read_jsonl(dest / "metrics.jsonl"), stats, per_step)
    print(metric_table((dest / "eval_results.csv").read_text()))
    print()
    print("\n".join(summary_lines(summary)))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
