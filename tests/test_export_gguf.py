"""`loralab export-gguf`: GGUF files that llama.cpp runs with the fine-tune, the right prompt and the right stop."""

import json

import numpy as np
import pytest
import torch

from loralab import cli
from loralab.commands.export_gguf import go_template, ollama_pieces, permute_rope, render_with_pieces
from loralab.data import (
    conversation_prompt_ids,
    conversation_prompt_text,
    make_template,
)
from loralab.models import quant_check
from loralab.models.quant_check import change_verdict, survival_lines, survival_summary

PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?", "Describe a cat.",
           "Write a haiku about rain.", "Explain photosynthesis."]


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """(run dir, folder of the run's GGUFs, folder of the base model's f16 GGUF)."""
    _, rd = trained_run
    out = tmp_path_factory.mktemp("gguf")
    assert cli.main(["export-gguf", str(rd), "--out", str(out / "lora")]) == 0
    return rd, out / "lora"


def _field(reader, key):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype == np.uint8 else value.tolist()[0]


def test_gguf_metadata_says_llama_eos_bos_and_template(exported, tiny_model_dir):
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers import AutoTokenizer

    _, folder = exported
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for quant in ("f16", "q8_0"):
        reader = GGUFReader(folder / f"model-{quant}.gguf")
        assert _field(reader, "general.architecture") == "llama"
        assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
        assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
        # TinyLlama's template writes no BOS and loralab trains with one first: the file says add it.
        assert _field(reader, "tokenizer.ggml.add_bos_token") is True
        assert _field(reader, "tokenizer.chat_template") == tok.chat_template
        assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(tok)
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert {types[n] for n in ("token_embd.weight", "output.weight")} == {GGMLQuantizationType.F16}
        want = GGMLQuantizationType.F16 if quant == "f16" else GGMLQuantizationType.Q8_0
        assert {types[t.name] for t in reader.tensors if len(t.shape) == 2 and t.name.startswith("blk.")} == {want}
        assert {types[t.name] for t in reader.tensors if len(t.shape) == 1} == {GGMLQuantizationType.F32}  # norms
        # 2 layers x 9 tensors + embeddings, final norm and the untied head.
        assert len(reader.tensors) == 2 * 9 + 3


def test_modelfile_template_renders_what_training_renders(exported, tiny_model_dir):
    from transformers import AutoTokenizer

    _, folder = exported
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf") and 'PARAMETER stop "</s>"' in modelfile
    template = make_template(AutoTokenizer.from_pretrained(tiny_model_dir))
    pieces = ollama_pieces(lambda m: conversation_prompt_text(template, m))
    assert f'TEMPLATE """{go_template(pieces)}"""' in modelfile
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."},
             {"role": "user", "content": "Bye"}]
    for n in (1, 3, 5):
        assert render_with_pieces(pieces, turns[:n]) == conversation_prompt_text(template, turns[:n])


def test_rope_permutation_moves_rotate_half_pairs_next_to_each_other():
    # One head of dim 4: transformers pairs rows (0, 2) and (1, 3); llama.cpp wants them adjacent.
    weight = torch.arange(8.0).reshape(4, 2)
    assert permute_rope(weight, 1)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]


def test_unsupported_architecture_fails_cleanly(tmp_path, capsys):
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, architectures=["GPT2LMHeadModel"])
    config.save_pretrained(tmp_path)
    capsys.readouterr()
    assert cli.main(["export-gguf", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Llama-architecture" in err and "GPT2LMHeadModel" in err, err
    assert not (tmp_path / "gguf").exists()


def test_existing_output_folder_is_refused(exported, capsys):
    rd, folder = exported
    before = (folder / "model-f16.gguf").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["export-gguf", str(rd), "--out", str(folder)]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert (folder / "model-f16.gguf").stat().st_mtime_ns == before


def _llama_greedy(llm, ids, n):
    """llama.cpp's greedy continuation of the token ids, stopping at an end-of-generation token."""
    import llama_cpp

    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(out) == n:
            break
        out.append(token)
    return out


def _transformers_greedy(model, ids, n, eos):
    with torch.no_grad():
        seq = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    new = seq[0, len(ids):].tolist()
    return new[: new.index(eos)] if eos in new else new


def _agree(model, ids, ours, theirs, margin=0.05):
    """Equal, or the first difference is where transformers itself nearly ties (f16 rounding may flip it)."""
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            with torch.no_grad():
                logits = model(torch.tensor([ids + ours[:i]])).logits[0, -1]
            top = logits.topk(2).values
            return float(top[0] - top[1]) < margin
    return len(ours) == len(theirs)


def test_llama_cpp_runs_the_f16_gguf_like_transformers_runs_the_merged_model(exported, tiny_model_dir, tmp_path):
    """The exported file in a real client: llama.cpp's greedy tokens equal transformers' on the merged model,
    and differ from the base model's GGUF where transformers' LoRA answers differ from the base's."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the dev extra (make test installs it)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.models.adapters import load_merged, resolve_target

    rd, folder = exported
    assert cli.main(["export-gguf", str(tiny_model_dir), "--out", str(tmp_path / "base"), "--quant", "f16"]) == 0
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = make_template(tok)
    merged, _ = load_merged(resolve_target(str(rd)), "test")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora_cpp = llama_cpp.Llama(str(folder / "model-f16.gguf"), n_ctx=256, n_threads=2, verbose=False)
    base_cpp = llama_cpp.Llama(str(tmp_path / "base" / "model-f16.gguf"), n_ctx=256, n_threads=2, verbose=False)
    differs = 0
    for prompt in PROMPTS:
        ids = conversation_prompt_ids(tok, template, [{"role": "user", "content": prompt}])
        ours = _transformers_greedy(merged, ids, 16, tok.eos_token_id)
        theirs = _llama_greedy(lora_cpp, ids, 16)
        assert _agree(merged, ids, ours, theirs), (prompt, ours, theirs)
        base_ours = _transformers_greedy(base, ids, 16, tok.eos_token_id)
        if base_ours != ours:
            differs += 1
            assert _llama_greedy(base_cpp, ids, 16) != theirs, prompt
    assert differs >= 3  # the fine-tune changes most answers, and survives the export


def test_change_verdict_says_whether_the_quantised_answer_kept_the_adapters_change():
    base, merged = "Paris is a city.", "Paris is the capital of France."
    assert change_verdict(base, base, "anything") is None  # the adapter changed nothing: nothing to keep
    assert change_verdict(base, merged, merged) == "kept"
    assert change_verdict(base, merged, "Paris is the capital.") == "kept"  # took merged's turn, then drifted
    assert change_verdict(base, merged, base) == "reverted"
    assert change_verdict(base, merged, "Paris is a town.") == "reverted"  # took base's turn
    assert change_verdict(base, merged, "Paris is my home.") == "other"  # a third token where they part
    assert change_verdict(base, merged, "Lyon is the capital of France.") == "other"  # parted from both earlier
    # The end of an answer counts as a token: base stopped where merged went on.
    assert change_verdict("Yes", "Yes, sir", "Yes") == "reverted"
    assert change_verdict("Yes", "Yes, sir", "Yes, madam") == "kept"
    assert change_verdict([1, 2, 3], [1, 2, 4], [1, 2, 3, 9]) == "reverted"  # token ids work the same

    summary = survival_summary(
        base=["a b", "c d", "e f", "g h", "same"],
        merged=["a X", "c Y", "e Z", "g W", "same"],
        quantised=["a X", "c Y", "e f", "q q", "same"],
    )
    assert {k: summary[k] for k in ("prompts", "same_as_merged", "changed", "kept", "reverted", "other")} == {
        "prompts": 5, "same_as_merged": 3, "changed": 4, "kept": 2, "reverted": 1, "other": 1}
    assert summary["verdicts"] == ["kept", "kept", "reverted", "other", None]
    prompts = ["one", "two", "Write a haiku about rain, please, in the style of Basho.", "four", "five"]
    summary_line, warning = survival_lines("q8_0", summary, prompts)
    assert summary_line == ("export-gguf: q8_0 keeps the fine-tune's change on 2 of 4 prompts where the adapter "
                            "changed the answer (1 reverted to the base model's answer, 1 parted otherwise); "
                            "same answer as the merged model on 3 of 5")
    assert warning.startswith("export-gguf: warning: q8_0 undoes the fine-tune on 1 of 4 changed prompts")
    assert warning.endswith('3 "Write a haiku about rain, please, in..."')
    assert len(survival_lines("f16", survival_summary(["a"], ["b"], ["b"]), ["one"])) == 1  # no warning


def _export_with_check(rd, out, *extra):
    """Export the run's q8_0 file with the five PROMPTS as its fixed prompts, 16 new tokens (the adapter changes
    at least three of those answers: see the llama.cpp test above)."""
    return cli.main(["export-gguf", str(rd), "--out", str(out), "--quant", "q8_0", *extra,
                     "--set", f"eval.prompts={json.dumps(PROMPTS)}", "--set", "eval.max_new_tokens=16"])


def _manifest_check(rd):
    return json.loads((rd / "manifest.json").read_text())["gguf"]["check"]


def test_export_checks_the_fine_tune_survives_in_llama_cpp(trained_run, tmp_path, capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the dev extra (make test installs it)")
    _, rd = trained_run
    capsys.readouterr()
    assert _export_with_check(rd, tmp_path / "gguf") == 0
    out = capsys.readouterr().out
    assert "at most 16 new tokens" in out
    lines = [line for line in out.splitlines() if line.startswith("export-gguf: q8_0 keeps the fine-tune's change on")]
    assert len(lines) == 1, out
    check = _manifest_check(rd)
    assert check["prompts"] == 5 and check["max_new_tokens"] == 16
    q8 = check["quants"]["q8_0"]
    assert q8["changed"] >= 3 and q8["kept"] + q8["reverted"] + q8["other"] == q8["changed"]
    assert f"on {q8['kept']} of {q8['changed']} prompts where the adapter changed the answer" in lines[0]


def test_export_warns_when_quantisation_reverts_the_fine_tune(trained_run, tiny_model_dir, tmp_path, capsys,
                                                               monkeypatch):
    from transformers import AutoModelForCausalLM

    from loralab.generation import generate_greedy

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def base_answers(path, prompts, max_new_tokens, eos_token_ids):  # a file that lost the fine-tune
        return generate_greedy(base, prompts, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                               progress=False)

    monkeypatch.setattr(quant_check, "llama_cpp_installed", lambda: True)
    monkeypatch.setattr(quant_check, "gguf_answers", base_answers)
    _, rd = trained_run
    capsys.readouterr()
    assert _export_with_check(rd, tmp_path / "gguf") == 0  # a warning, not a failure
    out = capsys.readouterr().out
    q8 = _manifest_check(rd)["quants"]["q8_0"]
    assert q8["changed"] >= 3 and q8["reverted"] == q8["changed"] and q8["kept"] == 0
    assert (f"export-gguf: q8_0 keeps the fine-tune's change on 0 of {q8['changed']} prompts where the adapter "
            f"changed the answer ({q8['changed']} reverted to the base model's answer)") in out
    warning = [line for line in out.splitlines() if line.startswith("export-gguf: warning: q8_0 undoes the fine-tune")]
    assert len(warning) == 1 and f"on {q8['changed']} of {q8['changed']} changed prompts" in warning[0], out
    assert (tmp_path / "gguf" / "model-q8_0.gguf").is_file()


def test_export_without_llama_cpp_says_the_check_was_skipped(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quant_check, "llama_cpp_installed", lambda: False)
    _, rd = trained_run
    capsys.readouterr()
    assert _export_with_check(rd, tmp_path / "gguf") == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.out.splitlines() if "check skipped" in line]
    assert len(skipped) == 1 and "pip install llama-cpp-python" in skipped[0], captured.out
    assert "keeps the fine-tune's change" not in captured.out, captured.out
    assert _manifest_check(rd) == {"skipped": "llama-cpp-python is not installed"}
