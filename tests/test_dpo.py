"""DPO, IPO and cDPO against their closed forms, and a DPO run on held-out pairs."""

import json
import math

import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.model.io import load_run_model
from chatforge.stages.dpo import dpo_loss, reply_logprobs, run_dpo
from chatforge.tokenizer import load_tokenizer
from conftest import learning_config


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


def test_reply_logprobs_sum_only_assistant_tokens(pretrained):
    from chatforge.data.chat import pad_id, tokenize_conversation

    model, tok = load_run_model(pretrained[0]), load_tokenizer(pretrained[0])
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    ids, mask = tokenize_conversation(tok, conv)
    with torch.no_grad():
        got = reply_logprobs(model, [(ids, mask)], pad_id(tok), "cpu")[0]
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])), -1)[0]
    want = sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1) if mask[t + 1])
    assert math.isclose(got.item(), float(want), rel_tol=1e-5)


@pytest.mark.learning
def test_dpo_raises_held_out_preference_accuracy(pretrained, tasks, tmp_path, measured):
    cfg = learning_config(None, ["train.steps=100", "train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=5",
                             "train.eval_every=100", "train.eval_batches=2", "train.checkpoint_every=1000",
                             "train.weight_decay=0.0", "dpo.beta=0.1"])
    result = run_dpo(cfg, pretrained[0], tasks / "prefs_train.jsonl", tasks / "prefs_val.jsonl", tmp_path / "dpo")
    # at the start policy = reference: every implicit reward is 0, the accuracy 0 and the loss ln 2
    # measured 0.66-0.68 over 3 seeds, fp32 (docs/testing.md); a coin would score 0.5
    assert measured("val_reward_accuracy", result["val_reward_accuracy"]) >= 0.58
    assert measured("val_reward_margin", result["val_reward_margin"]) > 0
    assert measured("val_loss", result["val_loss"]) < math.log(2) - 0.05  # measured 0.55-0.59; ln 2 = 0.69


def closer_to_twelve_chars(prompt: str, response: str, **row) -> float:
    """A graded reward for the on-policy pairs test: any small model's samples differ by it."""
    return -abs(len(response.strip()) - 12)


def test_best_and_worst_of_each_group_and_never_a_cut_off_reply():
    from chatforge.stages.pairs import best_and_worst
    from chatforge.stages.rollout import Round

    rows = [{"prompt": "a"}] * 3 + [{"prompt": "b"}] * 3 + [{"prompt": "c"}] * 3
    texts = ["a1", "a2", "a3", "b1", "b2", "b3", "c1", "c2", "c3"]
    ended = torch.tensor([True, True, False, True, True, True, True, False, False])
    scores = torch.tensor([0.2, 0.9, 5.0, 1.0, 1.0, 1.0, 3.0, 0.0, 0.0])
    rnd = Round(rows=rows, texts=texts, sequences=torch.zeros(9, 2), mask=torch.zeros(9, 1), ended=ended)
    # a: a3 scores best but never ended; b: all tie; c: only one ended reply
    assert best_and_worst(rnd, scores, 3) == [{"prompt": "a", "chosen": "a2", "rejected": "a1"}]
    # every (better, worse) pair of ended replies, up to per_group of them: a gold judge's 0/1 labels
    ranked = Round(rows=[{"prompt": "d"}] * 4, texts=["d1", "d2", "d3", "d4"], sequences=torch.zeros(4, 2),
                   mask=torch.zeros(4, 1), ended=torch.tensor([True, True, True, True]))
    gold = torch.tensor([1.0, 0.0, 1.0, 0.0])
    every = best_and_worst(ranked, gold, 4, per_group=10)
    assert sorted((p["chosen"], p["rejected"]) for p in every) == [("d1", "d2"), ("d1", "d4"), ("d3", "d2"),
                                                                    ("d3", "d4")]
    assert len(best_and_worst(ranked, gold, 4, per_group=2)) == 2


def test_pairs_from_the_policys_samples_rank_by_the_reward(sft_run, tasks, tmp_path):
    from chatforge.stages.pairs import run_pairs

    out = tmp_path / "pairs.jsonl"
    result = run_pairs(sft_run[0], tasks / "prompts_train.jsonl", "test_dpo:closer_to_twelve_chars", out,
                       group_size=4, max_new_tokens=16, limit=24)
    pairs = [json.loads(line) for line in out.open(encoding="utf-8")]
    assert result == {"prompts": 24, "pairs": len(pairs)} and len(pairs) >= 12
    for p in pairs:
        assert closer_to_twelve_chars("", p["chosen"]) > closer_to_twelve_chars("", p["rejected"])
    with pytest.raises(ChatforgeError, match="at least 2"):
        run_pairs(sft_run[0], tasks / "prompts_train.jsonl", "test_dpo:closer_to_twelve_chars", out, group_size=1)


@pytest.mark.learning
def test_the_nll_term_keeps_the_chosen_replies_likely(pretrained, tasks, tmp_path, measured):
    """RPO: plain DPO may lower log π(chosen) as long as log π(rejected) falls faster; the NLL term on the
    chosen replies holds them up, on held-out pairs, at the same preference accuracy or better."""
    from chatforge.data.chat import pad_id
    from chatforge.stages.reward import load_pairs

    tok = load_tokenizer(pretrained[0])
    val, _ = load_pairs(tasks / "prefs_val.jsonl", tok, 256, with_mask=True)
    val = val[:64]

    def chosen_logp(run) -> float:
        with torch.no_grad():
            return reply_logprobs(load_run_model(run), [c for c, _ in val], pad_id(tok), "cpu").mean().item()

    results, logps = {}, {}
    for coef in (0.0, 1.0):
        cfg = learning_config(None, ["train.steps=80", "train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=5",
                                     "train.eval_every=80", "train.eval_batches=2", "train.checkpoint_every=1000",
                                     "train.weight_decay=0.0", "dpo.beta=0.1", f"dpo.nll_coef={coef}"])
        out = tmp_path / f"dpo{coef}"
        results[coef] = run_dpo(cfg, pretrained[0], tasks / "prefs_train.jsonl", tasks / "prefs_val.jsonl", out)
        logps[coef] = chosen_logp(out)
    assert measured("nll_lift", logps[1.0] - logps[0.0]) > 1.0, logps  # nats per chosen reply, held out
    assert measured("chosen_logp_gain", logps[1.0] - chosen_logp(pretrained[0])) > 0
    # the test-size model's held-out preference accuracy levels off at 0.60-0.67 (0 at the start, 0.5 a coin):
    # measured over 7 seeded runs, fp32, docs/testing.md; the NLL term changes it by -0.03 to +0.01
    accuracy = measured("rpo_val_reward_accuracy", results[1.0]["val_reward_accuracy"])
    plain = measured("dpo_val_reward_accuracy", results[0.0]["val_reward_accuracy"])
    assert accuracy >= 0.58 and accuracy >= plain - 0.06
