"""On a CUDA GPU (skipped elsewhere; bench/gpu_check.sh runs these): the precision decided for the real card, and
`loralab train` end to end in that precision, and in fp16 with loss scaling."""

import math

import pytest
import torch

from loralab import devices
from loralab.cli import main
from loralab.files import read_jsonl
from loralab.precision import choose_precision

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_real_card_gets_a_profile_and_the_rule_s_precision():
    from loralab.planning import measure as estimate
    facts = devices.probe("cuda")
    expected = "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"
    assert choose_precision(facts) == expected
    assert estimate.profile_for(facts).default_precision == expected


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_train_on_the_gpu(tmp_path, tiny_model_dir, alpaca_path, precision):
    from conftest import write_config

    cfg = write_config(tmp_path / "c.yaml", model={"name_or_path": str(tiny_model_dir)},
                       data={"path": str(alpaca_path)}, train={"device": "cuda", "precision": precision})
    assert main(["prepare", str(cfg)]) == 0
    assert main(["train", str(cfg)]) == 0
    losses = [r["loss"] for r in read_jsonl(tmp_path / "runs" / "t" / "metrics.jsonl") if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
