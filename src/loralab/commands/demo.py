"""`loralab demo`: the whole pipeline, offline, on a CPU, in a few minutes.

A smoke run of every stage on a tiny Llama built from a config (random weights, under a million parameters)
with a tokenizer trained locally, on a generated instruction dataset in Alpaca format. The data is
made so that learning is visible in a few hundred steps: answers follow fixed phrasings around facts
drawn from small tables, so the adapter can learn both the phrasing and the facts. It says nothing
about TinyLlama's quality; the reference experiment (configs/tinyllama-alpaca.yaml) needs the real model.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from loralab.config import load_config
from loralab.files import atomic_write_text
from loralab.models.tiny import build_tiny_llama
from loralab.stages import pipeline

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Cuba": "Havana", "Chile": "Santiago", "Poland": "Warsaw", "Ireland": "Dublin",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "early": "late", "light": "dark",
    "loud": "quiet", "old": "new", "rich": "poor", "strong": "weak", "open": "closed", "high": "low",
}
COLORS = {
    "banana": "yellow", "strawberry": "red", "leaf": "green", "sky": "blue", "snow": "white",
    "coal": "black", "orange": "orange", "grape": "purple", "carrot": "orange", "lemon": "yellow",
}
FRENCH = {
    "cat": "chat", "dog": "chien", "horse": "cheval", "bird": "oiseau", "fish": "poisson",
    "cow": "vache", "mouse": "souris", "rabbit": "lapin", "pig": "cochon", "sheep": "mouton",
}
NAMES = ["Alice", "Bob", "Carmen", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Keiko", "Liam"]
NUMBER_WORDS = ["three", "four", "five", "six", "seven"]


def make_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` Alpaca-format records from six task families, seeded."""
    rng = random.Random(seed)

    def capital():
        country = rng.choice(list(CAPITALS))
        return {"instruction": f"What is the capital of {country}?", "input": "",
                "output": f"The capital of {country} is {CAPITALS[country]}."}

    def opposite():
        word = rng.choice(list(OPPOSITES))
        return {"instruction": f"What is the opposite of {word}?", "input": "",
                "output": f"The opposite of {word} is {OPPOSITES[word]}."}

    def color():
        thing = rng.choice(list(COLORS))
        return {"instruction": f"What color is a {thing}?", "input": "",
                "output": f"A {thing} is usually {COLORS[thing]}."}

    def greet():
        name = rng.choice(NAMES)
        return {"instruction": f"Write a short greeting for {name}.", "input": "",
                "output": f"Hello {name}, it is great to see you today!"}

    def translate():
        animal = rng.choice(list(FRENCH))
        return {"instruction": "Translate this animal name into French.", "input": animal,
                "output": f"In French, {animal} is {FRENCH[animal]}."}

    def count():
        k = rng.randrange(len(NUMBER_WORDS))
        return {"instruction": f"Count from one to {NUMBER_WORDS[k]}.", "input": "",
                "output": ", ".join(str(i) for i in range(1, k + 4)) + "."}

    families = [capital, opposite, color, greet, translate, count]
    return [rng.choice(families)() for _ in range(n)]


DEMO_PROMPTS = [
    "What is the capital of Japan?",
    "What is the opposite of fast?",
    "Write a short greeting for Grace.",
    "What color is a banana?",
    "Count from one to five.",
]


def demo_config(out: Path, model_dir: Path, data_file: Path) -> dict:
    return {
        "name": "demo",
        "output_dir": str(out / "runs"),
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data_file), "num_examples": None, "eval_size": 40, "seed": 42, "max_length": 64},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "train": {
            "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 200,
            "learning_rate": 2e-3, "warmup_steps": 20, "logging_steps": 10, "save_steps": 100,
            "eval_loss_steps": 50, "seed": 42, "precision": "fp32", "device": "cpu",
        },
        "eval": {"max_new_tokens": 24, "prompts": DEMO_PROMPTS},
    }


def setup(out: str | Path) -> Path:
    """Build the tiny model, its tokenizer and the data under ``out`` (offline); return the demo's config file.

    The notebook and anyone scripting the demo start here; :func:`run` is this plus every stage.
    """
    out = Path(out)
    records = make_records(1200, seed=0)
    data_file = out / "demo_data.json"
    atomic_write_text(data_file, json.dumps(records, indent=1))
    model_dir = out / "tiny-llama"
    if not (model_dir / "config.json").exists():
        texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in records]
        build_tiny_llama(model_dir, texts, vocab_size=400, hidden_size=128, num_hidden_layers=4, fan_in_head=True)
        print(f"demo: built a tiny Llama and tokenizer offline in {model_dir}")
    config_file = out / "demo.yaml"
    atomic_write_text(config_file, _yaml(demo_config(out, model_dir, data_file)))
    return config_file


def run(out: str | Path) -> Path:
    """Build the tiny model and data under ``out``, run every stage, print where the report is."""
    start = time.perf_counter()
    config_file = setup(out)
    cfg = load_config(config_file)
    pipeline.run_all(cfg)
    report = cfg.run_dir / "report.md"
    print(f"demo: finished in {time.perf_counter() - start:.0f} s. Report: {report}")
    print(f"demo: the config it ran is {config_file}; rerun any stage with e.g. `loralab eval {config_file}`")
    return report


def _yaml(cfg: dict) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)
