"""loralab.planning: arithmetic on decided switches (no torch, no file), with measure.py the only I/O."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from loralab import decisions
from loralab.config import LoraSection, TrainConfig
from loralab.devices import DeviceFacts
from loralab.models.tiny import TINYLLAMA_CONFIG
from loralab.planning import measure, profiles
from loralab.planning.inputs import PlanInputs, row_layout
from loralab.planning.plan import plan_for
from loralab.planning.shapes import model_shape

LLAMA = dict(TINYLLAMA_CONFIG, model_type="llama")
A100 = replace(profiles.PROFILES["a100"], memory_bytes=80 * 2**30)


def _inputs(profile=A100, lengths=(300,) * 8, **kw) -> PlanInputs:
    return PlanInputs(LLAMA, LoraSection(), TrainConfig(), list(lengths), profile, **kw)


def _item(plan, label: str) -> float:
    return next(m.bytes for m in plan.memory if m.label == label)


def test_importing_decisions_and_planning_loads_no_torch():
    code = ("import sys, loralab.decisions, loralab.planning.plan, loralab.planning.measure; "
            "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_a_plan_is_a_function_of_its_inputs_and_switches():
    inputs = _inputs()
    switches = decisions.decide_for(inputs, "bf16")
    first, again = plan_for(inputs, switches), plan_for(inputs, switches)
    assert first.peak_bytes == again.peak_bytes and first.microbatch_seconds == again.microbatch_seconds
    checkpointed = plan_for(inputs, switches._replace(gradient_checkpointing=True))
    assert _item(checkpointed, "activations") < _item(first, "activations")
    assert checkpointed.microbatch_seconds > first.microbatch_seconds  # one more forward


def test_onednn_weights_add_one_copy_of_the_linear_weights_exactly():
    cpu = replace(profiles.PROFILES["cpu"], memory_bytes=64 * 2**30)
    inputs = _inputs(cpu)
    switches = decisions.decide_for(inputs, "bf16")
    on = plan_for(inputs, switches._replace(onednn_weights=True))
    off = plan_for(inputs, switches._replace(onednn_weights=False))
    shape = model_shape(LLAMA)
    head = shape.vocab_size * shape.hidden_size  # TinyLlama's head is untied: converted too
    linear = shape.num_layers * sum(a * o for a, o in shape.module_dims().values()) + head
    assert _item(on, "oneDNN weights") == linear * 2
    assert on.peak_bytes - off.peak_bytes == pytest.approx(linear * 2, abs=1)  # sums of floats: to the byte


def test_a_packed_row_pays_its_block_mask_unless_flash_attention_keeps_examples_apart():
    lengths = [200, 150, 100, 50] * 2  # packed into rows of the longest example on a GPU
    sdpa = plan_for(_inputs(lengths=lengths), decisions.decide_for(_inputs(lengths=lengths), "bf16"))
    flash_inputs = _inputs(lengths=lengths, attn_implementation="flash_attention_2")
    flash = plan_for(flash_inputs, decisions.decide_for(flash_inputs, "bf16"))
    assert sdpa.peak_tokens == flash.peak_tokens
    mask = sdpa.peak_tokens**2 * A100.allocator_factor  # bool (tokens x tokens), held by the allocator
    assert abs(_item(sdpa, "activations") - _item(flash, "activations") - mask) < 1e-6 * mask


def test_rows_follow_the_row_tokens_switch():
    inputs = _inputs(lengths=[400, 300, 200, 100] * 2)
    switches = decisions.decide_for(inputs, "bf16")
    wide = row_layout(inputs, switches._replace(row_tokens=1000))
    narrow = row_layout(inputs, switches._replace(row_tokens=400))
    assert wide.row_tokens == 1000 and wide.peak_tokens == 1000 and wide.rows_per_step == 2
    assert narrow.peak_tokens == 400 and narrow.rows_per_step == 5 and narrow.packed  # 2,000 tokens, 400 a row


def test_the_cpu_profile_says_whose_constants_it_holds():
    other = DeviceFacts("cpu", "Some Other CPU", 8 * 2**30, native_bf16=False)
    reference = profiles.cpu_profile_for(other, 16 * 2**30)
    assert set(reference.peak_flops) == {"fp32"} and reference.default_precision == "fp32"
    assert "NOT this CPU" in reference.basis and reference.memory_bytes == 8 * 2**30
    calibrated = profiles.cpu_profile_for(other, 16 * 2**30, {"fp32": 5e10}, "measured just now")
    assert calibrated.peak_flops == {"fp32": 5e10} and "matmul peaks of this CPU" in calibrated.basis
    assert "measured just now" in calibrated.description


def test_a_matmul_peak_is_measured_by_each_clock():
    for clock in ("wall", "cpu", "idle"):
        assert 1e6 < measure.matmul_peak("fp32", size=64, seconds=0.01, clock=clock) < 1e14


def test_the_kept_heap_grows_with_the_log_of_the_steps_only_when_rows_change_length():
    import math

    from loralab.planning.inputs import Rows
    from loralab.planning.memory import HEAP_GROWTH_PER_LOG_STEP, heap_growth_items

    def rows(lengths):
        return Rows(1024, [lengths[0]], 0, [[n] for n in lengths], 1.0, 0.0, 0.0, False)

    varying, same = rows([300, 700, 1000]), rows([512, 512, 512])
    (item,) = heap_growth_items(1e9, 1.3, varying, 500)
    assert item.bytes == 1e9 * HEAP_GROWTH_PER_LOG_STEP * math.log(500) and "500 steps" in item.note
    assert heap_growth_items(1e9, 1.3, varying, 50)[0].bytes < item.bytes  # fewer steps, less growth
    assert heap_growth_items(1e9, 1.3, same, 500) == []  # rows of one length reuse the same blocks
    assert heap_growth_items(1e9, 1.0, varying, 500) == []  # freed memory given back at once: nothing kept
