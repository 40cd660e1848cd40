"""`loralab export-gguf`: the merged model as GGUF files (f16, q8_0) for llama.cpp, with an Ollama Modelfile.

Written with the ``gguf`` package (llama.cpp's own Python writer), for the Llama architecture. What a GGUF
needs beside the weights, and what users most often find wrong in exported fine-tunes, is written from the
model's own tokenizer: the vocabulary and merges, the chat template, the EOS that ends an answer, and whether
a BOS goes first. That last flag follows the rule loralab trains and evaluates with (`loralab.data.adds_bos`),
so llama.cpp builds the same token ids as training did.

After writing, a run's export checks that the fine-tune survives the export (`check_fine_tune`): on the run's
fixed prompts (eval.prompts) it compares each file's greedy answers in llama.cpp with the merged model's and,
where the adapter changed the answer, with the base model's (transformers), and says how many changes each
file kept. Rounding can undo a fine-tune quietly: on SmolLM2-135M-Instruct, q8_0 gave the base model's answer
on the one prompt where the adapter had changed it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from loralab.data import adds_bos, conversation_prompt_text, make_template
from loralab.errors import LoralabError
from loralab.files import check_free_space, check_output_dir, replace_dir
from loralab.models.adapters import load_base, load_merged, parameter_count, require_adapter, resolve_target
from loralab.models.loading import resolve_model_source
from loralab.models.quant_check import survival_check
from loralab.runs.layout import RunDir

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
GGUF_DIR = "gguf"
QUANT_TYPES = ("f16", "q8_0")
# llama.cpp's pre-tokenizer names by the hash of the ids of one probe text (from llama.cpp's
# convert_hf_to_gguf.py, which detects byte-level BPE pre-tokenizers the same way).
PRE_TOKENIZER_PROBE = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple '
    'emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 '
    '3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо '
    'на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s '
    'there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve '
    'a\'lL'
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
}


def check_architecture(config) -> None:
    """Refuse, in one line, a model the Llama GGUF writer would get wrong."""
    archs = list(getattr(config, "architectures", None) or [type(config).__name__])
    if not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise LoralabError(
            f"export-gguf writes Llama-architecture models ({', '.join(SUPPORTED_ARCHITECTURES)}); this model is "
            f"{archs[0]}: run `loralab merge` and convert the merged folder with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = rope_settings(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise LoralabError(
            f"export-gguf does not write rope scaling '{rope['rope_type']}'; use llama.cpp's convert_hf_to_gguf.py"
        )


def rope_settings(config) -> dict:
    """RoPE theta and scaling as one dict, from either transformers 5's rope_parameters or the older fields."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def permute_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k projection rows from transformers' rotate-half layout to llama.cpp's interleaved pairs.

    (out, in): within each head the first half of the rows pairs with the second half in transformers;
    llama.cpp's Llama rope rotates adjacent rows (0, 1), (2, 3), ... (as llama.cpp's converter does).
    """
    halves = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(state_dict: dict[str, torch.Tensor], config):
    """(GGUF tensor name, float32 array) for every weight llama.cpp reads."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    for name, tensor in state_dict.items():
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue  # computed by llama.cpp / the same tensor as token_embd
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise LoralabError(
                f"export-gguf has no GGUF name for the weight {name}; this Llama variant is not supported"
            )
        data = tensor.detach().to(torch.float32)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_rope(data, n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_rope(data, n_kv)
        yield new, data.numpy()


# Kept in f16 inside a q8_0 file: the token embedding and the output head (one tensor when they are tied, as
# in SmolLM2). Every logit is a dot product with a row of the head, so rounding it to 8 bits moves every
# logit; llama.cpp's own quantizer offers the same choice (--token-embedding-type, --output-tensor-type).
Q8_0_KEPT_F16 = ("token_embd.weight", "output.weight")


def encode_tensor(name: str, data: np.ndarray, quant: str):
    """(array, GGML type): norms stay float32; matrices f16, or q8_0 where rows split into 32-value blocks
    (except the embedding and output head, `Q8_0_KEPT_F16`)."""
    import gguf

    if data.ndim == 1:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if quant == "q8_0" and data.shape[-1] % 32 == 0 and name not in Q8_0_KEPT_F16:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def gguf_bytes(config, n_params: int, quant: str) -> int:
    """About how large a GGUF of ``quant`` is: 2 bytes a weight in f16; q8_0 stores 32 int8 values and one f16
    scale per block (34/32 bytes a weight), except the embedding and head, kept in f16."""
    if quant == "f16":
        return 2 * n_params
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return int((n_params - embeddings) * 34 / 32 + 2 * embeddings)


def write_hparams(writer, config, quant: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = rope_settings(config)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def token_table(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text and GGUF token type, padded with unused entries up to the model's vocab_size."""
    import gguf

    if len(tokenizer) > vocab_size:
        raise LoralabError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings")
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens.append(text)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_vocab(writer, tokenizer, vocab_size: int, add_bos: bool) -> None:
    """Tokenizer, special tokens and chat template.

    Byte-level BPE is written as llama.cpp's "gpt2" tokenizer, sentencepiece-style BPE as "llama".
    """
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        spec = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
        tokens, types = token_table(tokenizer, vocab_size)
        byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
        if spec["model"]["type"] == "BPE" and byte_level:
            probe = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_PROBE)).encode()).hexdigest()
            if probe not in PRE_TOKENIZERS:
                raise LoralabError(
                    "export-gguf does not know this tokenizer's pre-tokenizer; use llama.cpp's convert_hf_to_gguf.py"
                )
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(PRE_TOKENIZERS[probe])
            special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
        elif spec["model"]["type"] == "BPE":
            # Sentencepiece-style BPE (▁ for spaces): llama.cpp merges the adjacent pair whose result scores
            # highest, and a BPE vocabulary lists merge results in merge order, so the score is minus the id.
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_scores([0.0 if t != gguf.TokenType.NORMAL else -float(i) for i, t in enumerate(types)])
            special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
        else:
            raise LoralabError(f"export-gguf writes BPE tokenizers; this one is {spec['model']['type']}")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.special_token_ids.update(eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    if tokenizer.bos_token_id is not None:
        special.special_token_ids["bos"] = tokenizer.bos_token_id
    special.add_special_token.update(bos=add_bos, eos=False)
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def write_gguf(path: Path, model, tokenizer, quant: str, add_bos: bool, name: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    write_hparams(writer, model.config, quant)
    write_vocab(writer, tokenizer, model.config.vocab_size, add_bos)
    for gguf_name, data in gguf_tensors(model.state_dict(), model.config):
        array, qtype = encode_tensor(gguf_name, data, quant)
        writer.add_tensor(gguf_name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


OLLAMA_PROBES = ("LORALAB_USER_ONE", "LORALAB_ASSISTANT_ONE", "LORALAB_USER_TWO")


def ollama_pieces(render) -> dict[str, str] | None:
    """The chat template cut into the fixed texts an Ollama (Go) template needs, or None when it cannot be.

    ``render(messages) -> str`` renders a conversation for the next answer as training does. Rendering one
    and two user turns with probe words gives: the text before the first user turn ("head"), after a user
    turn up to its answer ("after_user"), after an answer up to the next user turn ("after_answer"), and
    after the last user turn ("tail", the generation prompt). System messages are not carried over (the
    template's default system text is, inside "head").
    """
    u1, a1, u2 = OLLAMA_PROBES
    one = render([{"role": "user", "content": u1}])
    two = render([{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                  {"role": "user", "content": u2}])
    head, _, tail = one.partition(u1)
    if not two.startswith(head + u1) or not two.endswith(u2 + tail):
        return None
    after_user, found, after_answer = two[len(head + u1): len(two) - len(u2 + tail)].partition(a1)
    pieces = {"head": head, "after_user": after_user, "after_answer": after_answer, "tail": tail}
    if not found or any("{{" in text or '"""' in text for text in pieces.values()):
        return None
    return pieces


def go_template(pieces: dict[str, str]) -> str:
    """The Ollama TEMPLATE: Go's text/template over .Messages, with the texts of `ollama_pieces`."""
    return (
        "{{- range $i, $m := .Messages }}{{ if eq $i 0 }}" + pieces["head"] + "{{ end }}"
        '{{- if eq $m.Role "user" }}{{ $m.Content }}{{ if eq (len (slice $.Messages $i)) 1 }}' + pieces["tail"]
        + "{{ else }}" + pieces["after_user"] + "{{ end }}"
        '{{- else if eq $m.Role "assistant" }}{{ $m.Content }}' + pieces["after_answer"] + "{{ end }}{{ end }}"
    )


def render_with_pieces(pieces: dict[str, str], messages: list[dict[str, str]]) -> str:
    """What `go_template` renders for ``messages`` (user and assistant turns), computed in Python for tests."""
    out = pieces["head"]
    for i, message in enumerate(messages):
        if message["role"] == "user":
            out += message["content"] + (pieces["tail"] if i == len(messages) - 1 else pieces["after_user"])
        elif message["role"] == "assistant":
            out += message["content"] + pieces["after_answer"]
    return out


def modelfile_text(gguf_file: str, template: str | None, stops: list[str]) -> str:
    lines = [f"FROM ./{gguf_file}", ""]
    if template is not None:
        lines += [f'TEMPLATE """{template}"""', ""]
    else:
        lines += ["# No TEMPLATE: Ollama uses the chat template stored in the GGUF file.", ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def load_for_export(tgt):
    """(model, tokenizer): the run's merged model, or a model folder as it is (to export a base model too)."""
    if tgt.cfg is not None:
        return load_merged(tgt, "export-gguf")
    return load_base(tgt.model, torch.float32)


def run(target: str, out: str | None = None, quants: list[str] | tuple[str, ...] = QUANT_TYPES,
        overwrite: bool = False, overrides: list[str] | None = None) -> Path:
    """Write model-<quant>.gguf for each of ``quants`` and a Modelfile into ``out`` (default <run>/gguf); for a
    run, then check each file keeps the fine-tune's answers (`check_fine_tune`, when llama-cpp-python is installed)."""
    from transformers import AutoConfig

    start = time.perf_counter()
    tgt = resolve_target(target, overrides)
    if tgt.cfg is not None:
        require_adapter(tgt, "export-gguf")
    home = tgt.run_dir if tgt.cfg is not None else Path(tgt.model.name_or_path)
    dest = Path(out) if out else home / GGUF_DIR
    check_output_dir(dest, overwrite, "GGUF files")
    config = AutoConfig.from_pretrained(resolve_model_source(tgt.model), revision=tgt.model.revision)
    check_architecture(config)
    n_params = parameter_count(config)
    need = int(sum(gguf_bytes(config, n_params, q) for q in quants) * 1.02)
    check_free_space(dest.parent, need, "GGUF files")

    model, tokenizer = load_for_export(tgt)
    template = make_template(tokenizer, tgt.cfg.data.template if tgt.cfg is not None else "auto")
    render = lambda messages: conversation_prompt_text(template, messages)
    add_bos = adds_bos(tokenizer, render([{"role": "user", "content": "Hi"}]))
    pieces = ollama_pieces(render)
    name = tgt.cfg.name if tgt.cfg is not None else Path(tgt.model.name_or_path).name
    files = [f"model-{q}.gguf" for q in quants]

    def fill(folder: Path) -> None:
        for quant, file in zip(quants, files, strict=False):
            write_gguf(folder / file, model, tokenizer, quant, add_bos, name)
        stops = [tokenizer.eos_token]
        modelfile = modelfile_text(files[-1], go_template(pieces) if pieces else None, stops)
        (folder / "Modelfile").write_text(modelfile, encoding="utf-8")

    replace_dir(dest, fill)
    if tgt.cfg is not None:
        RunDir(tgt.cfg).update_manifest(gguf={"path": str(dest.resolve()), "files": files, "add_bos": add_bos,
                                              "check": None})
    sizes = ", ".join(f"{f} {(dest / f).stat().st_size / 1e6:.1f} MB" for f in files)
    print(f"export-gguf: {sizes}, Modelfile -> {dest} ({time.perf_counter() - start:.0f} s)")
    if tgt.cfg is None:
        return dest

    # Does the fine-tune survive the export? Never fails the export for want of llama.cpp.
    ggufs = {q: dest / f for q, f in zip(quants, files, strict=True)}
    check = survival_check(tgt, model, tokenizer, template, ggufs)
    RunDir(tgt.cfg).update_manifest(gguf={"check": check})
    return dest
