"""The main job at full demo scale (about 21 minutes on 2 cores, with every alignment method): `make test-slow`."""

import json

import pytest

from chatforge.demo import run_demo


@pytest.mark.slow
def test_demo_pipeline_numbers_on_held_out_data(tmp_path):
    r = run_demo(tmp_path / "demo", align=("ppo", "dpo", "grpo"))
    assert r["val_bpb"] < 0.8 * r["unigram_bpb"]  # pre-training: far below the unigram baseline
    assert r["sft_end_rate"] >= 0.95 and r["base_end_rate"] <= 0.2  # SFT answers and stops; base rambles
    assert r["copy_exact"] >= 0.9  # the copy phase: held-out lines repeated exactly (measured 96%)
    assert r["sft_success"] >= r["base_success"] + 0.2  # held-out keywords: copied, not recalled (measured 29.5%)
    assert r["rm_accuracy"] >= 0.8
    assert r["classify_accuracy"] >= r["classify_majority"] + 0.4
    assert r["pretrain_seconds"] < 240
    # Alignment (issue 4), on the demo's 200 held-out prompts, with the KL to SFT bounded. Measured: SFT 29.5%,
    # PPO 31.0% (KL 1.74), GRPO 32.0% (KL 8.48), DPO 30.5%. Only GRPO's gain holds on all 369 held-out prompts
    # (+2.4 points; PPO +0.8, DPO -0.8): docs/rlhf.md. The +10 points the issue aims for are not reached.
    assert r["ppo_success"] > r["sft_success"] and 0 <= r["ppo_kl"] < 5.0
    assert r["grpo_success"] >= r["sft_success"] + 0.02 and 0 <= r["grpo_kl"] < 12.0
    assert r["grpo_reward_last"] > r["grpo_reward_first"] + 0.1  # on fresh keywords: measured 0.30 -> 0.45
    assert r["rm_seconds"] + r["ppo_seconds"] < 240  # the RL part of `make demo`: measured 175 s
    # DPO with the NLL term: held-out implicit-reward accuracy (0 at the start, policy = reference; measured 88%)
    assert r["dpo_preference_accuracy"] >= 0.85 and r["dpo_success"] > r["sft_success"]
    # Evaluation (chatforge eval) and the report, on the same held-out splits.
    assert abs(r["base_bpb"] - r["val_bpb"]) < 0.05 * r["val_bpb"]  # eval's bits/byte agrees with pre-training's
    assert r["sft_choice_accuracy"] > r["choice_chance"]  # WordNet glosses: a little above chance
    assert r["base_rm_win_rate"] < 0.25  # the reward model prefers SFT's replies to the base model's
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
