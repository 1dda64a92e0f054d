"""The main job at full demo scale, with every alignment method, then a second run that only evaluates:
`make test-slow` (about 24 minutes on 2 cores)."""

import json

import pytest

from chatforge.demo import run_demo


@pytest.mark.slow
def test_demo_pipeline_numbers_on_held_out_data(tmp_path):
    r = run_demo(tmp_path / "demo", align=("ppo", "dpo", "grpo"))
    assert r["val_bpb"] < 0.8 * r["unigram_bpb"]  # pre-training: far below the unigram baseline
    assert r["sft_end_rate"] >= 0.95 and r["base_end_rate"] <= 0.2  # SFT answers and stops; base rambles
    # the copy phase: held-out lines repeated exactly (measured English 78%, Chinese 19%; first character 80%)
    assert r["copy_exact_en"] >= 0.7 and r["copy_exact_zh"] >= 0.1
    assert r["sft_success"] >= r["base_success"] + 0.45  # held-out keywords: copied, not recalled (measured 53.9%)
    assert r["sft_success_zh"] >= 0.25  # Chinese too, since the copy phase has enough of it (measured 33.6%)
    assert r["rm_accuracy"] >= 0.85  # measured 91.4%
    assert r["classify_accuracy"] >= r["classify_majority"] + 0.4
    # Alignment (issue 4), on all 369 held-out prompts, with the KL to SFT bounded. Measured: SFT 53.9%, DPO 59.1%
    # (but SFT on DPO's chosen lines alone gives 61.2%), GRPO 55.6% (KL 7.32), PPO 51.2% (KL 2.57): the reward
    # model cannot tell the policy's near misses from its successes (docs/rlhf.md). No method reaches the +10
    # points the issue aims for.
    assert r["dpo_preference_accuracy"] >= 0.7 and r["dpo_success"] >= r["sft_success"] + 0.03
    assert r["grpo_success"] >= r["sft_success"] + 0.01 and 0 <= r["grpo_kl"] < 12.0
    assert r["grpo_reward_last"] > r["grpo_reward_first"] + 0.03  # on fresh keywords: measured 0.33 -> 0.39
    assert r["ppo_success"] >= r["sft_success"] - 0.05 and 0 <= r["ppo_kl"] < 5.0  # PPO does not gain (-2.7)
    assert r["ppo_reward_last"] > r["ppo_reward_first"] + 0.5  # yet its reward-model score rises: -2.29 -> -1.39
    # Why PPO cannot gain: the reward model ranks real lines (91.4%) but not the SFT model's own replies: a success
    # outscores a failure about half the time (measured AUC 50.6%). If a better reward model lifts this, PPO's
    # assert above should become a gain (docs/rlhf.md, "Sixth round").
    assert 0.0 <= r["sft_rm_auc"] < 0.6 and r["rm_accuracy"] > r["sft_rm_auc"] + 0.3
    # Evaluation (chatforge eval) and the report, on the same held-out splits.
    assert abs(r["base_bpb"] - r["val_bpb"]) < 0.05 * r["val_bpb"]  # eval's bits/byte agrees with pre-training's
    assert r["sft_choice_accuracy"] > r["choice_chance"]  # WordNet glosses: a little above chance
    assert r["base_rm_win_rate"] < 0.5  # the reward model prefers SFT's replies to the base model's (58% to 42%)
    assert r["sft_toxic_rate"] == 0.0 and r["ppo_toxic_rate"] == 0.0
    demo = tmp_path / "demo"
    stages = ("tokenizer", "data", "pretrain", "tasks", "copy", "sft", "rm", "ppo", "dpo", "grpo", "classify", "eval")
    for stage in stages:
        energy = json.loads((demo / stage / "energy.json").read_text())
        assert energy["seconds"] > 0 and energy["co2_g"] == pytest.approx(energy["kwh"] * energy["grid_g_per_kwh"])
    html = (demo / "report" / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 7 and "not run yet" not in html
    # Run again: every stage is complete, so only eval and report run.
    again = run_demo(demo, align=("ppo", "dpo", "grpo"))
    assert again["this_run_seconds"] < 0.25 * r["this_run_seconds"] and again["sft_success"] == r["sft_success"]
    assert again["total_seconds"] == pytest.approx(r["total_seconds"], rel=0.1)  # what the run cost is kept
