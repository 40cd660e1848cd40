"""report.html and `loralab compare` read back with a parser: every number on the page is the files' number,
the page fetches nothing, and the pure building blocks do what they say."""

import csv
import json
import math
import re
from html.parser import HTMLParser

import pytest
import yaml
from html_page import parse_page
from report_runs import EXAMPLES, make_run, predictions

from loralab import cli
from loralab.commands.compare import (
    aligned_predictions,
    comparability_warnings,
    compare_page,
    differing_fields,
    flatten,
    run_labels,
)
from loralab.reporting.html import change_cell, nice_ticks, tick_labels
from loralab.reporting.markdown import markdown, markdown_inline
from loralab.reporting.page import OPEN_FIXED_PROMPTS, OPEN_PREDICTION_ROWS, split_examples
from loralab.runs.readers import format_lr, format_metric, read_metrics, read_run, training_rows
from loralab.stages.evaluate import examples_markdown
from loralab.stages.report import build_report, report_page

# A model's answer at its worst for a page: a screen long, words that do not break (a URL, a run of x's),
# Markdown of its own, and markup that must stay text.
LONG_ANSWER = (
    "LoRA adds a low-rank update to the frozen weights, so that training touches few parameters. " * 8
    + "See https://example.com/" + "a-very-long-path/" * 12 + " or " + "x" * 120
)
SCRIPT = '<script>alert("x")</script>'


def long_run(path, *, n: int = 16, name: str = "long", r: int = 8):
    """A reported run with ``n`` held-out prompts and ``n`` fixed prompts, every answer like LONG_ANSWER; its
    examples.md is what the eval stage writes (``examples_markdown``), not a hand-made imitation."""
    run_dir = make_run(path, name=name, r=r)
    rows = []
    for i in range(n):
        row = dict(predictions()[i % len(EXAMPLES)], instruction=f"Held-out prompt {i + 1}: {EXAMPLES[i % 6][0]}")
        row.update(reference=LONG_ANSWER[:400], base=LONG_ANSWER, lora=f"**Bold** {LONG_ANSWER} {SCRIPT}")
        rows.append(row)
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = f"{LONG_ANSWER}\n\n- a list item\n- another\n\n```python\nprint('<x>')  # **not bold**\n```"
    lora = f"`code` and **bold**: {LONG_ANSWER}\n{SCRIPT} <img src=x onerror=alert(1)> [click](javascript:alert(1))"
    prompts = [f"Fixed prompt {i + 1}: explain <LoRA> & rank" for i in range(n)]
    (run_dir / "examples.md").write_text(examples_markdown(prompts, [base] * n, [lora] * n))
    build_report(run_dir)
    return run_dir


def section_html(text: str, section_id: str) -> str:
    return re.search(rf'<section id="{section_id}">(.*?)</section>', text, re.DOTALL)[1]


class _Tags(HTMLParser):
    """Every start tag of a page, and every attribute as (tag, name, value)."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.attrs = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]


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


def test_report_html_fixed_prompts_are_rendered_markdown(tmp_path):
    text = (long_run(tmp_path / "run") / "report.html").read_text()
    examples = section_html(text, "examples")
    assert '<pre class="md">' not in text
    assert examples.count("<strong>Base:</strong>") == examples.count("<strong>LoRA:</strong>") == 16
    assert examples.count("<blockquote>") == 32 and "\n&gt; " not in examples  # each answer quoted, no "> " left
    assert "<h3>Before and after</h3>" in examples  # examples.md's own headings sit below the section's <h2>
    assert "<summary>1. Fixed prompt 1: explain &lt;LoRA&gt; &amp; rank</summary>" in examples
    # The answers' own Markdown: a list, bold, inline code, and a code block whose ** stays as written.
    assert "<ul>\n<li>a list item</li>\n<li>another</li>\n</ul>" in examples
    assert "<p><code>code</code> and <strong>bold</strong>: LoRA adds" in examples
    code = '<pre><code class="language-python">print(&#x27;&lt;x&gt;&#x27;)  # **not bold**</code></pre>'
    assert examples.count(code) == 16 and examples.replace(code, "").count("**") == 0  # no raw Markdown left
    # Each fixed prompt folds; the first few are open.
    opened = re.findall(r'<details class="prompt"( open)?>', examples)
    assert opened == [" open"] * OPEN_FIXED_PROMPTS + [""] * (16 - OPEN_FIXED_PROMPTS)


def test_report_html_model_output_stays_text(tmp_path):
    text = (long_run(tmp_path / "run") / "report.html").read_text()
    tags = _Tags(text)
    assert tags.tags.count("script") == 1  # the page's own; the answers' <script> is text
    assert "a" not in tags.tags and tags.tags.count("img") == 1  # no link from [click](...), no <img> from an answer
    assert not [a for a in tags.attrs if a[1].startswith("on") or "javascript:" in (a[2] or "")]
    escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"
    assert section_html(text, "examples").count(escaped) == 16 and section_html(text, "prompts").count(escaped) == 16
    assert "&lt;img src=x onerror=alert(1)&gt; [click](javascript:alert(1))" in text


def test_report_html_long_sections_fold(tmp_path):
    # A few held-out prompts: their table shows open; many: it folds to one line, a click away.
    few = (make_run(tmp_path / "few") / "report.html").read_text()
    assert re.search(r'<details id="predictions-details" open><summary>All 6 held-out prompts[^<]*</summary>\n'
                     r'<div class="table-wrap"><div class="filter">.*?<table id="predictions"', few, re.DOTALL)
    many = (long_run(tmp_path / "many", n=OPEN_PREDICTION_ROWS + 1) / "report.html").read_text()
    assert re.search(r'<details id="predictions-details"><summary>All 9 held-out prompts.*?<table id="predictions"',
                     many, re.DOTALL)
    assert "<details" not in section_html(many, "results")  # the summary table never folds


def test_split_examples():
    text = "# Before\n\nintro\n```\n## code, not a prompt\n```\n\n## 1. One\n\n> a\n> ## quoted\n\n## 2. Two\nb"
    preamble, prompts = split_examples(text)
    assert preamble == "# Before\n\nintro\n```\n## code, not a prompt\n```\n"
    assert prompts == [("1. One", "\n> a\n> ## quoted\n"), ("2. Two", "b")]
    assert split_examples("no headings") == ("no headings", [])


def test_markdown_renders_the_subset_and_escapes_the_rest():
    assert markdown("# Title <x>\n\n## Sub", heading_offset=2) == "<h3>Title &lt;x&gt;</h3>\n<h4>Sub</h4>"
    assert markdown("**Base:**\n\n> line one\n> line *two*\n>\n> next") == (
        "<p><strong>Base:</strong></p>\n<blockquote>\n<p>line one<br>\nline <em>two</em></p>\n"
        "<p>next</p>\n</blockquote>")
    assert markdown("Steps:\n1. one\n2. two\n\n3) x") == (
        '<p>Steps:</p>\n<ol>\n<li>one</li>\n<li>two</li>\n</ol>\n<ol start="3">\n<li>x</li>\n</ol>')
    assert markdown("- a\n  - b\n- c") == "<ul>\n<li>a\n<ul>\n<li>b</li>\n</ul></li>\n<li>c</li>\n</ul>"
    assert markdown("```\n# not a heading & **not bold**\n```") == (
        "<pre><code># not a heading &amp; **not bold**</code></pre>")
    assert markdown("---") == "<hr>"
    assert markdown_inline("`a **b**` \\*c\\* __d__ snake_case_name 2 * 3") == (
        "<code>a **b**</code> *c* <strong>d</strong> snake_case_name 2 * 3")
    hostile = '<script>alert(1)</script> <a href="javascript:x" onclick="y">a</a> [l](javascript:x) ![i](data:x) &amp;'
    escaped = hostile.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    assert markdown(hostile) == f"<p>{escaped}</p>"
    assert "<blockquote>" in markdown(">" * 5000 + " deep")  # deep nesting is cut off, not a RecursionError
    assert markdown("") == "" and markdown("\n\n") == ""


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


def test_compare_of_runs_on_the_same_data_warns_of_nothing(runs, tmp_path, capsys):
    out = tmp_path / "compare.html"
    capsys.readouterr()
    assert cli.main(["compare", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert 'id="warnings"' not in out.read_text()


def _edit_run(run_dir, config=None, manifest=None, predictions=None):
    """Change a run directory's config.yaml and manifest.json sections (dotted keys) and predictions in place."""
    for name, changes, load, dump in (("config.yaml", config, yaml.safe_load, yaml.safe_dump),
                                      ("manifest.json", manifest, json.loads, json.dumps)):
        data = load((run_dir / name).read_text())
        for dotted, value in (changes or {}).items():
            *parents, key = dotted.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            node[key] = value
        (run_dir / name).write_text(dump(data))
    if predictions is not None:
        (run_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))


def test_compare_warns_when_runs_differ_in_data(tmp_path, capsys):
    a, b = make_run(tmp_path / "a", name="a"), make_run(tmp_path / "b", name="b", r=16)
    _edit_run(a, {"data.path": "x.json"}, {"data_sha256": "1a2b" * 16})
    _edit_run(b, {"data.path": "y.json"}, {"data_sha256": "3c4d" * 16})
    out = tmp_path / "compare.html"
    capsys.readouterr()
    assert cli.main(["compare", str(a), str(b), "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    want = ("runs differ in data (a: x.json sha256 1a2b1a2b1a2b.., b: y.json sha256 3c4d3c4d3c4d..): "
            "BLEU, ROUGE, the held-out loss and perplexity are not comparable between them, base or LoRA")
    assert err == [f"loralab compare: warning: {want}"]
    text = out.read_text()
    box = text.index('id="warnings"')
    assert box < text.index('id="runs-section"')  # at the top of the page, above every section
    assert want in text[box:text.index("</div>", box)]


def test_compare_names_what_each_difference_leaves_comparable(runs, tmp_path):
    one, two = read_run(runs[0]), read_run(runs[1])
    assert comparability_warnings([one, two]) == []
    # The same file under another path is the same data.
    two.config = {**two.config, "data": {**two.config["data"], "path": "elsewhere/alpaca.json"}}
    assert comparability_warnings([one, two]) == []
    # Another model on the same data and held-out set: the base columns differ, the LoRA gains still compare.
    two.config["model"] = {"name_or_path": "other/model"}
    [model] = comparability_warnings([one, two])
    assert model.startswith("runs differ in model (r8: TinyLlama/TinyLlama-1.1B-Chat-v1.0, r16: other/model)")
    assert "the base columns differ" in model and "LoRA gains" in model and "still compare" in model
    # A longer answer cap: BLEU and ROUGE are not comparable, the held-out loss is.
    two.config = {**one.config, "name": "r16", "eval": {**one.config["eval"], "max_new_tokens": 256}}
    [cap] = comparability_warnings([one, two])
    assert cap.startswith("runs differ in eval.max_new_tokens (r8: 64, r16: 256): BLEU and ROUGE are not comparable")
    assert cap.endswith("the held-out loss and perplexity still are")
    # Other held-out prompts: nothing compares.
    two.config = {**one.config, "name": "r16"}
    two.predictions = two.predictions[:3] + [{"instruction": "only here", "reference": "x", "lora": "y"}]
    [heldout] = comparability_warnings([one, two])
    assert heldout == ("runs differ in held-out set (r8: 6 held-out prompts; r16: 4 held-out prompts, 3 of them "
                       "also in r8): BLEU, ROUGE, the held-out loss and perplexity are not comparable between them, "
                       "base or LoRA")
    # Without predictions, the settings that draw the held-out split decide.
    two.predictions = None
    two.config = {**one.config, "name": "r16", "data": {**one.config["data"], "seed": 7}}
    [drawn] = comparability_warnings([one, two])
    assert drawn.startswith("runs differ in held-out set (r8: data.seed 0, r16: data.seed 7): they draw different")


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
