"""The main job at full demo scale (about 8 minutes on 2 cores): `make test-slow`."""

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
