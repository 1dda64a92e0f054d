"""The reward model: the Bradley-Terry loss against its closed form, and held-out pairwise accuracy."""

import json
import math

import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.stages.reward import bradley_terry_loss, load_pairs, load_reward_model, run_reward, score_responses
from chatforge.tokenizer import load_tokenizer
from conftest import REPO, learning_config


def test_bradley_terry_loss_closed_form():
    equal = torch.tensor([0.3, -1.0])
    assert math.isclose(bradley_terry_loss(equal, equal).item(), math.log(2), rel_tol=1e-6)
    chosen, rejected = torch.tensor([2.0]), torch.tensor([0.5])
    assert math.isclose(bradley_terry_loss(chosen, rejected).item(), math.log(1 + math.exp(-1.5)), rel_tol=1e-6)
    with_margin = bradley_terry_loss(chosen, rejected, margin=1.0).item()
    assert math.isclose(with_margin, math.log(1 + math.exp(-0.5)), rel_tol=1e-6)


def test_bad_and_degenerate_pairs(tokenizer_dir, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "", "rejected": "b"},
            {"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "c"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, skipped = load_pairs(path, tok, context=64)
    assert len(pairs) == 2 and skipped == {"identical": 1, "empty": 1, "too_long": 0}
    assert pairs[0][0] == pairs[1][0]  # the string form and the message form give the same ids
    path.write_text('{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(ChatforgeError, match=r"prefs.jsonl:1: .*\"rejected\""):
        load_pairs(path, tok, context=64)


@pytest.mark.learning
def test_reward_model_ranks_held_out_pairs(pretrained, tasks, tmp_path, measured):
    cfg = learning_config(REPO / "configs" / "demo-rm.toml", ["train.steps=150", "train.eval_every=1000"])
    result = run_reward(cfg, pretrained[0], tasks / "prefs_train.jsonl", tasks / "prefs_val.jsonl", tmp_path / "rm")
    assert measured("val_accuracy", result["val_accuracy"]) >= 0.75  # held-out keywords: the model must read the prompt
    model = load_reward_model(tmp_path / "rm")
    assert model.head.out_features == 1
    # `chatforge rm --score`: a held-out chosen reply scores above its rejected one
    pairs = [json.loads(line) for line in (tasks / "prefs_val.jsonl").read_text().splitlines()[:40]]
    rows = tmp_path / "score.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p["prompt"], "response": r}) + "\n"
                            for p in pairs for r in (p["chosen"], p["rejected"])))
    rewards = [reward for reward, _ in score_responses(tmp_path / "rm", rows)]
    right = sum(c > r for c, r in zip(rewards[0::2], rewards[1::2], strict=True)) / len(pairs)
    assert measured("scored_pairs_right", right) >= 0.7
    rows.write_text('{"prompt": "x"}\n')
    with pytest.raises(ChatforgeError, match="score.jsonl:1"):
        list(score_responses(tmp_path / "rm", rows))
