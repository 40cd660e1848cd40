import pytest
import torch
import torch.nn.functional as F

from loralab.config import LoraSection, ModelConfig
from loralab.loss import response_loss_sum
from loralab.models.loading import add_lora, load_model
from loralab.packing import pack_examples, plan_rows


def _examples(vocab, lengths, prompt_len=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        labels = [-100] * prompt_len + ids[prompt_len:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def _lora_model(model_dir):
    """The tiny Llama in fp32 with LoRA, no dropout, and B perturbed: B starts at zero, which would hide a
    wrong gradient through A."""
    torch.manual_seed(0)
    model = add_lora(load_model(ModelConfig(name_or_path=str(model_dir)), "fp32", "cpu"), LoraSection(lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def test_packed_loss_and_lora_grads_equal_one_by_one(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
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
    full = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                 use_cache=False)
    torch.testing.assert_close(s / n, full.loss, rtol=1e-5, atol=1e-6)


def test_pack_examples_layout():
    batch = pack_examples([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]},
                           {"input_ids": [1, 7], "labels": [-100, 7]}])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 7]]


def test_plan_rows_best_fit():
    lengths = [700, 300, 1200, 900, 100, 2100, 40]
    rows = plan_rows(lengths, 2048)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 2048 or len(r) == 1 for r in rows)
    assert len(rows) == 3  # 2100 alone; 1200+700+100+40; 900+300


def test_pack_rows_keeps_every_example_once_within_the_budget():
    from loralab.packing import pack_rows

    examples = _examples(1000, [300, 120, 700, 90, 250, 40])
    batch = pack_rows(examples, 512)
    lengths = [r["input_ids"].shape[1] for r in batch["rows"]]
    assert all(n <= 512 for n in lengths if n != 700) and 700 in lengths  # too long for a row: alone
    assert sum(lengths) == sum(len(e["input_ids"]) for e in examples)
    assert len(batch["rows"]) == 3  # 700 | 300 + 120 + 90 | 250 + 40
    # the step-level tensors the Trainer counts on: every trained target of every row, once
    trained = sum(int((r["labels"][0, 1:] != -100).sum()) for r in batch["rows"])
    assert int((batch["labels"] != -100).sum()) == trained == sum(len(e["input_ids"]) - 3 for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (1, sum(lengths))


def test_a_steps_update_does_not_depend_on_how_its_examples_are_split_into_rows(tmp_path, tiny_model_dir, alpaca_path):
    """loralab train's trainer: rows of one example each and one row holding a whole step train the same weights."""
    from loralab.config import config_from_dict
    from loralab.files import read_jsonl
    from loralab.runs.layout import RunDir
    from loralab.stages import prepare, train

    def trained_weights(row_tokens):
        cfg = config_from_dict({
            "name": "rows", "output_dir": str(tmp_path / "runs"), "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"path": str(alpaca_path), "num_examples": 24, "eval_size": 0, "max_length": 128},
            "lora": {"lora_dropout": 0.0},
            "train": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                      "warmup_steps": 0, "logging_steps": 1, "save_steps": 100, "device": "cpu", "precision": "fp32",
                      "row_tokens": row_tokens, "gradient_checkpointing": False},
        })
        prepare.run(cfg)
        examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in read_jsonl(RunDir(cfg).train_file)]
        switches = train.decide(cfg, examples)
        model = train.build_model(cfg, switches)
        trainer = train.build_trainer(cfg, model, examples, tmp_path / f"ckpt-{row_tokens}", [], switches)
        rows_seen = []
        real_step = trainer.training_step
        trainer.training_step = lambda m, inputs, n=None: (rows_seen.append(len(inputs["rows"]))
                                                           or real_step(m, inputs, n))
        trainer.train()
        weights = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        return weights, rows_seen, trainer.state.log_history

    alone, rows_alone, log_alone = trained_weights(1)
    together, rows_together, log_together = trained_weights(4096)
    assert rows_alone == [8, 8] and rows_together == [1, 1]  # 8 examples a step: 8 rows, or 1
    for name in alone:
        torch.testing.assert_close(together[name], alone[name], rtol=1e-4, atol=1e-6)
    losses = [[r["loss"] for r in log if "loss" in r] for log in (log_alone, log_together)]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert any("lora_B" in name and w.abs().max() > 0 for name, w in alone.items())  # B starts at zero: it trained


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_frozen_head_cross_entropy_equals_the_upcast_logits_loss(monkeypatch, dtype, tol):
    from loralab.cpu import head_loss

    monkeypatch.setattr(head_loss, "CHUNK_ROWS", 16)  # 50 positions: four chunks, the last one short
    torch.manual_seed(0)
    hidden = torch.randn(50, 32).to(dtype).requires_grad_()
    weight = torch.randn(300, 32).to(dtype)
    targets = torch.randint(0, 300, (50,))
    got = head_loss.FrozenHeadCrossEntropy.apply(hidden, weight, targets)
    (got * 0.5).backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    want = F.cross_entropy((ref_hidden @ weight.t()).float(), targets, reduction="sum")
    (want * 0.5).backward()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert hidden.grad.dtype == dtype
    assert (hidden.grad.float() - ref_hidden.grad.float()).norm() / ref_hidden.grad.float().norm() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_cross_entropy_of_targets_far_below_the_top_logit(monkeypatch, dtype):
    """A target whose probability underflows fp32 (logits hundreds apart) still gets its true loss, not infinity."""
    from loralab.cpu import head_loss

    monkeypatch.setattr(head_loss, "CHUNK_ROWS", 16)
    torch.manual_seed(0)
    hidden = (torch.randn(40, 32) * 30).to(dtype).requires_grad_()
    weight = torch.randn(300, 32).to(dtype)
    targets = torch.randint(0, 300, (40,))
    logits = (hidden.detach() @ weight.t()).float()
    assert (logits.amax(1) - logits.gather(1, targets[:, None]).squeeze(1) > 200).sum() > 20  # most underflow
    got = head_loss.FrozenHeadCrossEntropy.apply(hidden, weight, targets)
    got.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    want = F.cross_entropy((ref_hidden @ weight.t()).float(), targets, reduction="sum")
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-4, atol=1e-4)


def test_the_head_loss_buffers_first_made_under_inference_mode_still_train():
    from loralab.cpu import head_loss

    weight, targets = torch.randn(333, 32), torch.randint(0, 333, (40,))  # a vocabulary no other test uses
    with torch.inference_mode():  # a held-out pass or generation first in the process
        first = head_loss.token_losses(torch.randn(40, 32), weight, targets)
    hidden = torch.randn(40, 32, requires_grad=True)
    head_loss.FrozenHeadCrossEntropy.apply(hidden, weight, targets).backward()  # then training writes into them
    assert hidden.grad is not None and torch.isfinite(first).all()


def test_training_loss_and_grads_through_the_fused_head_equal_the_models_own_head(tiny_model_dir, monkeypatch):
    from loralab.cpu import head_loss

    model = _lora_model(tiny_model_dir)
    assert head_loss.frozen_plain_head(model) is not None  # the tiny Llama takes the fused path
    batch = pack_examples(_examples(model.config.vocab_size, [40, 25]))

    def run():
        model.zero_grad()
        s, n = response_loss_sum(model, batch)
        s.backward()
        return s.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    fused_loss, fused_grads = run()
    monkeypatch.setattr(head_loss, "frozen_plain_head", lambda m: None)  # the model's own forward and head
    own_loss, own_grads = run()
    torch.testing.assert_close(fused_loss, own_loss, rtol=1e-5, atol=1e-5)
    for name in own_grads:
        torch.testing.assert_close(fused_grads[name], own_grads[name], rtol=1e-4, atol=1e-6)
