"""bench/step_profile.py --ops: a profiled op's time goes to the kind that does its work."""

import pytest
import torch
from conftest import load_bench


@pytest.fixture(scope="module")
def step_profile():
    return load_bench("step_profile")


def test_ops_are_split_into_linear_matmuls_attention_matmuls_and_the_rest(step_profile):
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(48, 32)
    q, k = torch.randn(3, 16, 8), torch.randn(3, 8, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = torch.nn.functional.linear(x, w)
        scores = torch.bmm(q, k).softmax(-1)
        (y.sum() + scores.sum()).backward()
    seconds = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    kinds, rest = step_profile.op_seconds(seconds)

    linear_ops = {n for n in seconds if n in step_profile.LINEAR_OPS}
    assert linear_ops and "aten::bmm" in seconds and "aten::_softmax" in rest
    assert not linear_ops & set(rest) and "aten::bmm" not in rest
    assert kinds["linear layers' matmuls"] == pytest.approx(sum(seconds[n] for n in linear_ops))
    assert kinds["attention's matmuls"] == pytest.approx(seconds["aten::bmm"])
    assert kinds["everything else"] == pytest.approx(sum(rest.values()))
    assert sum(kinds.values()) == pytest.approx(sum(seconds.values()))
