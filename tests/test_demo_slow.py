"""The main job at full demo scale (about 10 minutes on 2 cores): `make test-slow`."""

import pytest

from chatforge.demo import run_demo


@pytest.mark.slow
def test_demo_pipeline_numbers_on_held_out_data(tmp_path):
    r = run_demo(tmp_path / "demo")
    assert r["val_bpb"] < 0.8 * r["unigram_bpb"]  # pre-training: far below the unigram baseline
    assert r["sft_end_rate"] >= 0.95 and r["base_end_rate"] <= 0.2  # SFT answers and stops; base rambles
    assert r["sft_success"] >= r["base_success"] + 0.05  # held-out keywords: copied, not recalled
    assert r["rm_accuracy"] >= 0.8
    assert r["classify_accuracy"] >= r["classify_majority"] + 0.4
    assert r["pretrain_seconds"] < 240
    # PPO against the reward model: the held-out reward-model score of greedy replies rises, the KL to
    # the SFT model stays bounded, and the RL part keeps to its time budget. The constraint success is
    # recorded but not claimed to rise: on held-out keywords it is limited by copying (docs/rlhf.md).
    assert r["ppo_rm_score"] > r["sft_rm_score"] + 0.1 and r["ppo_rm_win_rate"] > 0.5
    assert 0 <= r["ppo_kl"] < 5.0
    assert r["ppo_success"] >= r["sft_success"] - 0.05
    assert r["align_seconds"] < 240
