"""The FLOPs the benches' MFU divides by: the LM head counted only where a target is trained."""

import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def train_throughput():
    return load_bench("train_throughput")


def test_the_head_counts_only_at_trained_positions(train_throughput, tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from loralab import IGNORE_INDEX

    (tmp_path / "model").symlink_to(tiny_model_dir)
    ids = [list(range(10)), list(range(6))]
    # the targets are labels[1:]: 6 + 3 trained of 16 tokens
    labels = [[IGNORE_INDEX] * 4 + ids[0][4:], [IGNORE_INDEX] * 3 + ids[1][3:]]
    plain = [{"input_ids": i} for i in ids]
    every, params = train_throughput.flops_per_token(tmp_path, plain)
    all_trained, _ = train_throughput.flops_per_token(tmp_path, [{"input_ids": i, "labels": i} for i in ids])
    masked, same = train_throughput.flops_per_token(
        tmp_path, [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels, strict=True)])
    c = AutoConfig.from_pretrained(tiny_model_dir)
    assert same == params
    # a label at position 0 is never a target (an example of n tokens has n - 1): 14 of 16 with labels = ids
    assert every - all_trained == pytest.approx(4 * c.hidden_size * c.vocab_size * 2 / 16, rel=1e-12)
    assert every - masked == pytest.approx(4 * c.hidden_size * c.vocab_size * 7 / 16, rel=1e-12)
