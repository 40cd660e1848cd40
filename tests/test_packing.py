import torch

from loralab.config import LoraSection, ModelConfig
from loralab.loss import response_loss_sum
from loralab.modeling import add_lora, load_model
from loralab.packing import pack_examples, plan_rows


def _examples(vocab, lengths, prompt_len=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        labels = [-100] * prompt_len + ids[prompt_len:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_packed_loss_and_lora_grads_equal_one_by_one(tiny_model_dir):
    torch.manual_seed(0)
    model = add_lora(load_model(ModelConfig(name_or_path=str(tiny_model_dir)), "fp32", "cpu"), LoraSection(lora_dropout=0.0))
    # LoRA B starts at zero, which would hide a wrong gradient through A: perturb it.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    examples = _examples(model.config.vocab_size, [17, 5, 30, 11])

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    total, count = 0.0, 0
    for ex in examples:
        s, n = response_loss_sum(model, pack_examples([ex]))
        s.backward()
        total, count = total + s.item(), count + n
    one_by_one = grads()

    model.zero_grad()
    s, n = response_loss_sum(model, pack_examples(examples))
    s.backward()
    packed = grads()

    assert n == count == sum(len(e["input_ids"]) - 3 for e in examples)
    torch.testing.assert_close(s.item(), total, rtol=1e-5, atol=1e-5)
    for name in one_by_one:
        torch.testing.assert_close(packed[name], one_by_one[name], rtol=1e-4, atol=1e-6)


def test_logits_only_at_trained_targets_equal_full_loss(tiny_model_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), "fp32", "cpu")
    batch = pack_examples(_examples(model.config.vocab_size, [20, 9]))
    s, n = response_loss_sum(model, batch)
    full = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False)
    torch.testing.assert_close(s / n, full.loss, rtol=1e-5, atol=1e-6)


def test_pack_examples_layout():
    batch = pack_examples([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 7]]


def test_plan_rows_best_fit():
    lengths = [700, 300, 1200, 900, 100, 2100, 40]
    rows = plan_rows(lengths, 2048)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 2048 or len(r) == 1 for r in rows)
    assert len(rows) == 3  # 2100 alone; 1200+700+100+40; 900+300
