"""DPO, IPO and cDPO against their closed forms, and a DPO run on held-out pairs."""

import math

import pytest
import torch

from chatforge.config import load_config
from chatforge.errors import ChatforgeError
from chatforge.model.io import load_run_model
from chatforge.stages.dpo import dpo_loss, run_dpo, sequence_logprobs
from chatforge.tokenizer import load_tokenizer


def test_policy_equal_to_reference_gives_ln2():
    logp = torch.tensor([-12.0, -3.5, -40.0])
    loss, chosen, rejected = dpo_loss(logp, logp - 1, logp, logp - 1, beta=0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))


def test_dpo_ipo_cdpo_closed_forms():
    pc, pr, rc, rr, beta = torch.tensor([-5.0]), torch.tensor([-9.0]), torch.tensor([-6.0]), torch.tensor([-8.0]), 0.5
    h = beta * ((-5.0 + 6.0) - (-9.0 + 8.0))  # = 1.0
    sig = lambda z: 1 / (1 + math.exp(-z))
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    assert math.isclose(loss.item(), -math.log(sig(h)), rel_tol=1e-6)
    assert math.isclose(chosen.item(), 0.5) and math.isclose(rejected.item(), -0.5)
    eps = 0.1
    cdpo, _, _ = dpo_loss(pc, pr, rc, rr, beta, "cdpo", eps)
    assert math.isclose(cdpo.item(), -(1 - eps) * math.log(sig(h)) - eps * math.log(sig(-h)), rel_tol=1e-6)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo")
    assert math.isclose(ipo.item(), (h / beta - 1 / (2 * beta)) ** 2, rel_tol=1e-6)
    with pytest.raises(ChatforgeError, match="dpo.loss"):
        dpo_loss(pc, pr, rc, rr, beta, "hinge")


def test_sequence_logprobs_sum_only_assistant_tokens(pretrained):
    from chatforge.data.chat import pad_id, tokenize_conversation

    model, tok = load_run_model(pretrained[0]), load_tokenizer(pretrained[0])
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    ids, mask = tokenize_conversation(tok, conv)
    with torch.no_grad():
        got = sequence_logprobs(model, [(ids, mask)], pad_id(tok), "cpu")[0]
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])), -1)[0]
    want = sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1) if mask[t + 1])
    assert math.isclose(got.item(), float(want), rel_tol=1e-5)


def test_dpo_raises_held_out_preference_accuracy(pretrained, tasks, tmp_path):
    cfg = load_config(None, ["train.steps=100", "train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=5",
                             "train.eval_every=100", "train.eval_batches=2", "train.checkpoint_every=1000",
                             "train.weight_decay=0.0", "dpo.beta=0.1"])
    result = run_dpo(cfg, pretrained[0], tasks / "prefs_train.jsonl", tasks / "prefs_val.jsonl", tmp_path / "dpo")
    # at the start policy = reference: every implicit reward is 0, the accuracy 0 and the loss ln 2
    assert result["val_reward_accuracy"] >= 0.6 and result["val_reward_margin"] > 0
    assert result["val_loss"] < math.log(2) - 0.1
