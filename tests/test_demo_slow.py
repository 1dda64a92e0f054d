"""The main job at full demo scale, with every alignment method, then a second run that only evaluates:
`make test-slow` (18 to 24 minutes on 2 AVX-512 cores, about 40 on 2 AVX2 cores)."""

import json

import pytest

from chatforge.demo import run_demo
from chatforge.layout import DEMO_STEPS, FORM_STEPS


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
    # The reward model of curated pairs (issue 4) ranks real lines but is blind on the SFT model's own replies:
    # a success outscores a failure about half the time or less (AUC 50.6% / 27.9%). Kept to show why the
    # alignment part below learns its reward model from the policy's own samples instead (docs/rlhf.md).
    assert 0.0 <= r["sft_rm_auc"] < 0.6 and r["rm_accuracy"] > r["sft_rm_auc"] + 0.3
    # The alignment part (issue 21, demo_form.py): verse in a form, 300 held-out prompts, judged by a program;
    # PPO as iterated RLHF (two iterations, the reward model refreshed between them, β in units of its spread).
    # Measured on an AMD EPYC Zen 4 (2026-12-04, docs/rlhf.md), seed 1337, from the demo's bf16 SFT model / from
    # the one an AVX2 CPU trains in fp32: headroom +21.0 / +45.0; reward-model AUC 96.3% / 92.8% (refreshed:
    # 98.6% / 92.2%); PPO's gold success greedy +22.3 / +25.0, of samples at T = 1 +22.2 / +14.0 (KL 10.7 / 6.5).
    # Over six runs (3 seeds × both) the greedy aim (≥ +10) holds on all six (worst +13.3), the sampled on five.
    assert r["form_headroom"] >= 0.15  # pass@8 − greedy of the form-SFT model
    assert r["form_rm_auc"] >= 0.75  # the reward model sees the SFT model's own samples (84.4–97.9%)
    assert r["form_rm_iter2_auc"] >= 0.75  # and so does the refreshed one (85.6–98.6% over six runs)
    assert r["form_ppo_gain"] >= 0.10  # PPO against it raises the gold success of its greedy replies
    assert r["form_ppo_sample_gain"] >= 0.10 and 0 <= r["form_ppo_kl"] < 13.0  # and of its samples; KL bounded
    # reported on the same prompts (bf16): GRPO against the judge +18.0 greedy / +27.0 sampled, DPO +3.3 / +9.6
    assert r["form_grpo_gain"] >= 0.10 and r["form_dpo_gain"] >= -0.05
    # Evaluation (chatforge eval) and the report, on the same held-out splits.
    assert abs(r["base_bpb"] - r["val_bpb"]) < 0.05 * r["val_bpb"]  # eval's bits/byte agrees with pre-training's
    # WordNet glosses: the 4 M model knows few (SFT 26.0% / 28.0%, chance 25%, ±2.5 points for 300 questions)
    assert abs(r["sft_choice_accuracy"] - r["choice_chance"]) < 0.1
    assert r["base_rm_win_rate"] < 0.5  # the reward model prefers SFT's replies to the base model's (42% / 26%)
    assert r["sft_toxic_rate"] == 0.0
    demo = tmp_path / "demo"
    for stage in [*DEMO_STEPS, *(f"form/{s}" for s in FORM_STEPS)]:
        energy = json.loads((demo / stage / "energy.json").read_text())
        assert energy["seconds"] > 0 and energy["co2_g"] == pytest.approx(energy["kwh"] * energy["grid_g_per_kwh"])
    html = (demo / "report" / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 7 and "not run yet" not in html and "Gao et al." in html
    # Run again: every stage is complete, so only eval and report run.
    again = run_demo(demo, align=("ppo", "dpo", "grpo"))
    assert again["this_run_seconds"] < 0.25 * r["this_run_seconds"] and again["sft_success"] == r["sft_success"]
    assert again["total_seconds"] == pytest.approx(r["total_seconds"], rel=0.1)  # what the run cost is kept
