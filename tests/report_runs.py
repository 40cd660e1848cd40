"""Synthetic run directories for the HTML report and compare tests: varied answers and scores, so sorting
by the change has something to reorder, and a choice of LoRA rank, so two runs differ."""

from __future__ import annotations

import copy
import json

import yaml
from test_report import CONFIG, write_run_dir

from loralab.stages.report import build_report

# (instruction, input, reference, base answer, LoRA answer, ROUGE-L base, ROUGE-L LoRA)
EXAMPLES = [
    ("Name a primary colour.", "", "Red is a primary colour.", "Blue is nice.", "Red is a primary colour.", 0.25, 1.0),
    ("Translate into French.", "cat", "chat", "cat", "chien", 0.0, 0.0),
    ("Add the numbers.", "2 and 3", "2 + 3 = 5", "The sum is 5", "5", 0.4, 0.5),
    ("Write a haiku <about> the sea & sky.", "", "Waves fold into foam", "Waves fold into foam", "The sea is big",
     1.0, 0.2),
    ("Give a synonym for happy.", "", "Glad.", "Sad.", "Joyful, glad.", 0.0, 0.6667),
    ("Summarise: loralab.", "loralab fine-tunes models.", "It fine-tunes LLMs.", "It is a lab.",
     "It fine-tunes models.", 0.3333, 0.75),
]


def predictions(shift: float = 0.0) -> list[dict]:
    """predictions.jsonl rows as the eval stage writes them; ``shift`` moves every LoRA score (another run)."""
    rows = []
    for instruction, input_, reference, base, lora, rouge_base, rouge_lora in EXAMPLES:
        rows.append({
            "prompt": f"<|user|>\n{instruction}",
            "instruction": instruction,
            "input": input_,
            "reference": reference,
            "base": base,
            "lora": lora if not shift else f"{lora} (r16)",
            "scores": {
                "base": {"bleu": 0.1, "rouge1": rouge_base, "rouge2": 0.0, "rougeL": rouge_base},
                "lora": {"bleu": 0.2, "rouge1": rouge_lora, "rouge2": 0.0,
                         "rougeL": round(min(rouge_lora + shift, 1.0), 4)},
            },
        })
    return rows


def make_run(path, *, r: int = 8, name: str = "tiny-alpaca", shift: float = 0.0, loss_scale: float = 1.0):
    """A reported run directory at ``path`` (report.md and report.html built) and its path."""
    run_dir = write_run_dir(path)
    config = copy.deepcopy(CONFIG)
    config["name"], config["lora"]["r"], config["lora"]["lora_alpha"] = name, r, 2 * r
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions(shift)))
    if loss_scale != 1.0:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            for key in ("loss", "eval_loss"):
                if key in row:
                    row[key] = round(row[key] * loss_scale, 5)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        csv = (run_dir / "eval_results.csv").read_text().replace("0.2901", "0.3456").replace("0.1234567", "0.15")
        (run_dir / "eval_results.csv").write_text(csv)
    build_report(run_dir)
    return run_dir
