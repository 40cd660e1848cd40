"""loralab.decisions: row tokens, examples per process, the switch checks, and "auto" switches decided by asking
planning whether each candidate fits (values in, values out: nothing printed, nothing read)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from loralab import decisions
from loralab.config import LoraSection, TrainConfig, config_from_dict
from loralab.cpu.catalogue import TRAINING
from loralab.devices import DeviceFacts
from loralab.errors import LoralabError
from loralab.models.tiny import TINYLLAMA_CONFIG
from loralab.planning.inputs import PlanInputs
from loralab.planning.plan import plan_for
from loralab.planning.profiles import PROFILES

CPU = replace(PROFILES["cpu"], memory_bytes=64 * 2**30)
LLAMA = dict(TINYLLAMA_CONFIG, model_type="llama")
SMOLLM2 = dict(LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # SmolLM2-135M's shape


def _inputs(profile=CPU, train=None, lengths=(300,) * 8, **kw) -> PlanInputs:
    return PlanInputs(LLAMA, LoraSection(), train or TrainConfig(), list(lengths), profile, **kw)


def test_row_tokens_auto_is_the_catalogue_entry_on_a_cpu_and_the_longest_example_elsewhere():
    lengths = [100, 700, 300]
    cpu_rows = TRAINING[(True, "bf16")].row_tokens
    assert decisions.resolve_row_tokens(TrainConfig(), "cpu", lengths, "bf16", True) == cpu_rows
    assert decisions.resolve_row_tokens(TrainConfig(), "cuda", lengths, "bf16", True) == 700
    assert decisions.resolve_row_tokens(replace(TrainConfig(), row_tokens=256), "cpu", lengths) == 256
    # The fullest row of a step: the longest examples that fit together
    train = replace(TrainConfig(), per_device_train_batch_size=1, gradient_accumulation_steps=3, row_tokens=1000)
    assert decisions.fullest_row_tokens(train, "cpu", lengths) == 1000


def test_examples_per_process_split_a_step_evenly_or_say_how_to_launch():
    train = TrainConfig()  # 1 x 8 examples a step
    assert [decisions.per_process_examples(train, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(LoralabError, match="launch at most 8 processes"):
        decisions.per_process_examples(train, 16)
    with pytest.raises(LoralabError, match="do not split evenly over 3 processes"):
        decisions.per_process_examples(train, 3)


def test_onednn_weights_auto_needs_a_cpu_short_rows_and_no_checkpointing():
    assert decisions.can_use_onednn_weights("cpu", "bf16", 1024, False)
    assert decisions.can_use_onednn_weights("cpu", "fp32", 512, False)
    assert not decisions.can_use_onednn_weights("cpu", "bf16", 1025, False)
    assert not decisions.can_use_onednn_weights("cpu", "bf16", 512, True)
    assert not decisions.can_use_onednn_weights("cuda", "bf16", 512, False)


def test_auto_switches_take_the_fastest_candidate_that_fits():
    roomy = decisions.decide_for(_inputs(), "bf16")
    assert roomy.onednn_weights and not roomy.gradient_checkpointing
    assert roomy.cpu_pieces == TRAINING[(True, "bf16")] and roomy.per_example_attention
    plain = plan_for(_inputs(), roomy._replace(onednn_weights=False))
    checkpointed = plan_for(_inputs(), roomy._replace(onednn_weights=False, gradient_checkpointing=True))
    # memory for the plain weights but not for their oneDNN copy: plain weights, still no checkpointing
    between = replace(CPU, memory_bytes=int(plain.peak_bytes) + 1)
    assert decisions.decide_for(_inputs(between), "bf16")[4:6] == (False, False)
    # memory only for a checkpointed run: checkpointing on, plain weights
    tight = replace(CPU, memory_bytes=int(checkpointed.peak_bytes) + 1)
    assert decisions.decide_for(_inputs(tight), "bf16")[4:6] == (True, False)
    # an explicit choice is kept even where it does not fit
    forced = replace(TrainConfig(), gradient_checkpointing=False, onednn_weights=True)
    assert decisions.decide_for(_inputs(tight, forced), "bf16")[4:6] == (False, True)


def test_a_thin_models_long_rows_are_fast_and_a_wide_ones_are_not():
    from loralab.cpu import allocator

    lengths = (300,) * 8  # 2,400 tokens a step: two rows of 2,048 or three of 1,024
    thin = decisions.decide_for(PlanInputs(SMOLLM2, LoraSection(), TrainConfig(), list(lengths), CPU), "bf16")
    wide = decisions.decide_for(_inputs(lengths=lengths), "bf16")  # TinyLlama's shape
    # SmolLM2 keeps about 0.5 MB a token (30 layers): 2,048-token rows fit FAST_ROW_ACTIVATION_BYTES; TinyLlama's
    # 1.2 MB a token does not
    assert (thin.fast_row_tokens, thin.row_tokens, thin.longest_row_tokens) == (2048, 2048, 1800)
    assert (wide.fast_row_tokens, wide.row_tokens, wide.longest_row_tokens) == (1024, 1024, 900)
    assert thin.onednn_weights and wide.onednn_weights
    assert not allocator.lean(thin.longest_row_tokens, False, thin.fast_row_tokens)
    # the same 2,048-token rows asked for explicitly: fast for the thin model; lean, and no oneDNN weights, for the wide
    long_rows = replace(TrainConfig(), row_tokens=2048)
    thin_asked = decisions.decide_for(PlanInputs(SMOLLM2, LoraSection(), long_rows, list(lengths), CPU), "bf16")
    wide_asked = decisions.decide_for(_inputs(train=long_rows, lengths=lengths), "bf16")
    assert thin_asked == thin
    assert wide_asked.row_tokens == 2048 and wide_asked.fast_row_tokens == 1024 and not wide_asked.onednn_weights
    assert allocator.lean(wide_asked.longest_row_tokens, False, wide_asked.fast_row_tokens)
    # the plan counts the kept heap for the thin model's long rows, not for the wide model's
    assert "held by the allocator" in _activations_note(PlanInputs(SMOLLM2, LoraSection(), TrainConfig(),
                                                                   list(lengths), CPU), thin)
    assert "held by the allocator" not in _activations_note(_inputs(train=long_rows, lengths=lengths), wide_asked)
    # off a CPU, or without the model's shape, no row is fast beyond the 1,024 tokens measured everywhere
    assert decisions.fast_row_tokens(PlanInputs({}, LoraSection(), TrainConfig(), list(lengths), CPU), thin) == 1024
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "vocab_size": 50257}  # a shape the plan cannot read
    assert decisions.fast_row_tokens(PlanInputs(gpt2, LoraSection(), TrainConfig(), list(lengths), CPU), thin) == 1024
    unknown = LoraSection(target_modules=["c_attn"])
    assert decisions.fast_row_tokens(PlanInputs(SMOLLM2, unknown, TrainConfig(), list(lengths), CPU), thin) == 1024
    assert decisions.decide_for(_inputs(PROFILES["a100"]), "bf16").fast_row_tokens == 1024


def _activations_note(inputs: PlanInputs, switches) -> str:
    return next(item.note for item in plan_for(inputs, switches).memory if item.label == "activations")


def test_the_kept_heap_grows_by_at_most_a_1024_token_rows_share_of_the_activations():
    import math

    from loralab.planning.memory import HEAP_GROWTH_PER_LOG_STEP

    lengths = [300, 250, 200, 310, 280, 150, 330, 260] * 4  # rows of varying length
    grown = {}
    for name, config in (("thin", SMOLLM2), ("wide", LLAMA)):
        inputs = PlanInputs(config, LoraSection(), TrainConfig(max_steps=100), lengths, CPU)
        plan = plan_for(inputs, decisions.decide_for(inputs, "bf16"))
        items = {item.label: item.bytes for item in plan.memory}
        grown[name] = (items["heap growth"] / items["activations"], plan.peak_tokens)
    per_log_step = HEAP_GROWTH_PER_LOG_STEP * math.log(100)
    thin_share, thin_peak = grown["thin"]
    assert thin_peak > 1024 and thin_share == pytest.approx(per_log_step * 1024 / thin_peak)  # 2,048-token rows
    assert grown["wide"][1] <= 1024 and grown["wide"][0] == pytest.approx(per_log_step)  # the whole row's


def test_a_gpu_gets_no_cpu_pieces_and_an_unavailable_onednn_is_never_chosen():
    gpu = decisions.decide_for(_inputs(PROFILES["a100"]), "bf16")
    assert gpu.device == "cuda" and gpu.cpu_pieces is None and not gpu.per_example_attention
    assert gpu.row_tokens == 300 and not gpu.onednn_weights
    assert not decisions.decide_for(_inputs(), "bf16", onednn_available=False).onednn_weights
    eager = decisions.decide_for(_inputs(attn_implementation="eager"), "bf16")
    assert eager.cpu_pieces is not None and not eager.per_example_attention  # per-example attention replaces sdpa only


def test_decide_switches_returns_its_notes_instead_of_printing(monkeypatch, capsys):
    cfg = config_from_dict({"name": "x"})
    facts = DeviceFacts("cpu", "test CPU", 64 * 2**30, True)
    lengths, trained = [300] * 8, [200] * 8
    roomy = decisions.decide_switches(cfg, facts, lengths, trained, LLAMA)
    assert roomy.notes == () and not roomy.gradient_checkpointing
    checkpointed = plan_for(_inputs(trained_counts=trained), roomy._replace(onednn_weights=False,
                                                                          gradient_checkpointing=True))
    monkeypatch.setattr(decisions, "profile_for",
                        lambda facts, **_: replace(CPU, memory_bytes=int(checkpointed.peak_bytes)))
    tight = decisions.decide_switches(cfg, facts, lengths, trained, LLAMA)
    assert tight.gradient_checkpointing and "turning it on" in tight.notes[0]
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="config.json"):
        decisions.decide_switches(cfg, facts, lengths, trained, None)


def test_the_model_config_is_needed_only_where_an_auto_switch_asks_planning():
    auto = TrainConfig()
    explicit = replace(auto, gradient_checkpointing=False, onednn_weights=False, row_tokens=1024)
    assert decisions.needs_estimate(auto, "cuda", False)  # gradient checkpointing auto
    assert not decisions.needs_estimate(replace(auto, gradient_checkpointing=False), "cuda", True)
    assert decisions.needs_estimate(replace(explicit, onednn_weights="auto"), "cpu", True)
    assert not decisions.needs_estimate(replace(explicit, onednn_weights="auto"), "cpu", False)
    assert decisions.needs_estimate(replace(explicit, row_tokens="auto"), "cpu", False)  # the fast rows
    assert not decisions.needs_estimate(explicit, "cpu", True)


def test_switch_checks_name_the_key_to_change():
    with pytest.raises(LoralabError, match="train.torch_compile is for CUDA GPUs"):
        decisions.check_switches(config_from_dict({"name": "x", "train": {"torch_compile": True}}), "cpu")
    with pytest.raises(LoralabError, match="train.load_in_4bit"):
        decisions.check_bitsandbytes(True, "adamw_torch", "mps")
    cfg = config_from_dict({"name": "x", "train": {"onednn_weights": True}})
    with pytest.raises(LoralabError, match="set train.onednn_weights: auto"):
        decisions.check_switches(cfg, "cpu", "bf16", onednn_available=False)


def test_the_plan_counts_a_tied_heads_two_onednn_copies_and_an_untied_ones_one():
    """loralab.cpu.onednn_weights keeps a tied head's plain weight (the embeddings read it), so its two reordered
    copies come on top; every other frozen linear's plain copy is released, so one copy's worth comes on top."""
    def onednn_bytes(config):
        inputs = PlanInputs(config, LoraSection(), TrainConfig(), [300] * 8, CPU)
        switches = decisions.decide_for(inputs, "bf16")
        assert switches.onednn_weights
        return next(item.bytes for item in plan_for(inputs, switches).memory if item.label == "oneDNN weights")

    layers = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)  # q, o; k, v; gate, up, down
    head = 49152 * 576
    assert onednn_bytes(SMOLLM2) == 2 * (layers + 2 * head)
    assert onednn_bytes(dict(SMOLLM2, tie_word_embeddings=False)) == 2 * (layers + head)
