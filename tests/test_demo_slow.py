"""The main job at full demo scale, with every alignment method, then a second run that only evaluates:
`make test-slow` (about 24 minutes on 2 AVX-512 cores, 40 on 2 AVX2 cores)."""

import json

import pytest

from chatforge.demo import run_demo


@pytest.mark.slow
def test_demo_pipeline_numbers_on_held_out_data(tmp_path):
    r = run_demo(tmp_path / "demo", align=("ppo", "dpo", "grpo"))
    # precision "auto" gives bf16 on an AVX-512-bf16 CPU and fp32 on an AVX2 one, and the numbers differ: each
    # comment says "measured bf16 / fp32" (docs/testing.md, the demo's table); each margin holds for both.
    assert r["val_bpb"] < 0.8 * r["unigram_bpb"]  # pre-training: far below the unigram baseline (0.71 / 0.71)
    assert r["sft_end_rate"] >= 0.95 and r["base_end_rate"] <= 0.2  # SFT answers and stops; base rambles
    # the copy phase: held-out lines repeated exactly (measured English 78% / 85%, Chinese 19% / 22%)
    assert r["copy_exact_en"] >= 0.7 and r["copy_exact_zh"] >= 0.1
    assert r["sft_success"] >= r["base_success"] + 0.45  # held-out keywords: copied, not recalled (53.9% / 60.4%)
    assert r["sft_success_zh"] >= 0.25  # Chinese too, since the copy phase has enough of it (33.6% / 35.5%)
    assert r["rm_accuracy"] >= 0.8  # measured 91.4% / 87.6%
    assert r["classify_accuracy"] >= r["classify_majority"] + 0.4
    # Alignment (issue 4), on all 369 held-out prompts, with the KL to SFT bounded. Measured bf16 / fp32: SFT
    # 53.9% / 60.4%, DPO 59.1% / 53.7%, GRPO 55.6% / 59.1% (KL 7.3 / 9.0), PPO 51.2% / 49.9% (KL 2.6 / 2.2). The
    # reward model cannot tell the policy's near misses from its successes (docs/rlhf.md): no method gains on
    # both machines, and PPO loses up to 10.5 points. What is asserted is what holds on both (issue 21 is the fix).
    assert r["dpo_preference_accuracy"] >= 0.7 and r["dpo_success"] >= r["sft_success"] - 0.1  # 76.9% / 81.5%
    assert r["grpo_success"] >= r["sft_success"] - 0.05 and 0 <= r["grpo_kl"] < 12.0
    assert r["grpo_reward_last"] > r["grpo_reward_first"] + 0.03  # on fresh keywords: 0.33 -> 0.39 / 0.41 -> 0.53
    assert r["ppo_success"] >= r["sft_success"] - 0.15 and 0 <= r["ppo_kl"] < 5.0  # PPO loses (-2.7 / -10.6)
    assert r["ppo_reward_last"] > r["ppo_reward_first"] + 0.5  # yet its reward-model score rises: +0.9 / +1.4
    # Why PPO cannot gain: the reward model ranks real lines (91.4% / 87.6%) but not the SFT model's own replies:
    # a success outscores a failure about half the time or less (AUC 50.6% / 27.9%). If a better reward model
    # lifts this, PPO's assert above should become a gain (docs/experiments/rlhf-log.md, "Sixth round").
    assert 0.0 <= r["sft_rm_auc"] < 0.6 and r["rm_accuracy"] > r["sft_rm_auc"] + 0.3
    # Evaluation (chatforge eval) and the report, on the same held-out splits.
    assert abs(r["base_bpb"] - r["val_bpb"]) < 0.05 * r["val_bpb"]  # eval's bits/byte agrees with pre-training's
    # WordNet glosses: the 4 M model knows few (SFT 26.0% / 28.0%, chance 25%, ±2.5 points for 300 questions)
    assert abs(r["sft_choice_accuracy"] - r["choice_chance"]) < 0.1
    assert r["base_rm_win_rate"] < 0.5  # the reward model prefers SFT's replies to the base model's (42% / 26%)
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
