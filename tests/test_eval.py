"""`chatforge eval` and the demo's bookkeeping: bits per byte (against a direct computation, and held-out:
a trained model beats the unigram baseline and an untrained one), energy and CO2 arithmetic, run kinds and
their errors, and the demo's skip/resume of stages."""

import json
import math
import time

import numpy as np
import pytest
import torch

from chatforge.cli import main
from chatforge.data.shards import load_meta, open_tokens
from chatforge.demo import run_stage
from chatforge.errors import ChatforgeError
from chatforge.eval.bpb import bpb_on_shards, bpb_on_text, token_nll
from chatforge.eval.energy import measure
from chatforge.eval.suite import evaluate_policy, require_policy, run_kind
from chatforge.model.io import load_run_model
from chatforge.model.transformer import Transformer
from chatforge.tokenizer import load_tokenizer


def test_token_nll_predicts_every_token_once_and_matches_a_direct_computation(pretrained, data_dir):
    model = load_run_model(pretrained[0])
    ctx = model.cfg.context
    tokens = np.asarray(open_tokens(data_dir, "val")[: 3 * ctx + 17]).astype(np.int64)
    nll, count = token_nll(model, tokens, batch_size=2)  # a short last window, in a batch with a full one
    assert count == len(tokens) - 1
    direct = 0.0
    for start in range(0, len(tokens) - 1, ctx):  # each window on its own, no padding anywhere
        w = torch.from_numpy(tokens[start : start + ctx + 1])[None]
        logp = torch.log_softmax(model(w[:, :-1]).float(), -1)
        direct -= logp[0].gather(-1, w[0, 1:, None]).sum().item()
    assert nll == pytest.approx(direct, rel=1e-4)


@pytest.mark.learning
def test_held_out_bits_per_byte_beat_the_unigram_baseline_and_an_untrained_model(pretrained, data_dir, measured):
    model = load_run_model(pretrained[0])
    meta = load_meta(data_dir)
    trained = bpb_on_shards(model, data_dir, max_tokens=4096)
    untrained = bpb_on_shards(Transformer(model.cfg).eval(), data_dir, max_tokens=4096)
    assert measured("bpb_over_unigram", trained["bpb"] / meta["val_unigram_bpb"]) < 1 < untrained["bpb"] / meta[
        "val_unigram_bpb"]
    # within a few percent of what pre-training measured on its own val windows
    assert trained["bpb"] == pytest.approx(pretrained[1]["val_bpb"], rel=0.08)


def test_bits_per_byte_of_a_text_file(pretrained, tmp_path):
    model, tok = load_run_model(pretrained[0]), load_tokenizer(pretrained[0])
    english = tmp_path / "english.txt"
    english.write_text("And the LORD said unto Moses, Speak unto the children of Israel.\n" * 4, encoding="utf-8")
    noise = tmp_path / "noise.txt"
    noise.write_text("".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(120)), encoding="utf-8")
    assert bpb_on_text(model, tok, [english])["bpb"] < bpb_on_text(model, tok, [noise])["bpb"]
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ChatforgeError, match="no text"):
        bpb_on_text(model, tok, [empty])


def test_energy_record_follows_the_documented_equations(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_WATTS_PER_CORE", "8")
    monkeypatch.setenv("CHATFORGE_GRID_G_PER_KWH", "400")
    monkeypatch.setenv("CHATFORGE_PUE", "1.5")
    monkeypatch.setattr("chatforge.eval.energy.read_rapl_uj", lambda: None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with measure("pretrain", tmp_path):
        sum(range(200_000))
    e = json.loads((tmp_path / "energy.json").read_text())
    assert e["watts"] == 16 and e["pue"] == 1.5 and "8 W/core" in e["power_source"]
    assert e["kwh"] == pytest.approx(e["seconds"] / 3600 * 16 * 1.5 / 1000, rel=1e-2)
    assert e["co2_g"] == pytest.approx(e["kwh"] * 400)
    first = e["seconds"]
    with pytest.raises(RuntimeError), measure("pretrain", tmp_path, accumulate=True):  # a crash: time still counts
        raise RuntimeError("boom")
    assert json.loads((tmp_path / "energy.json").read_text())["seconds"] >= first
    with measure("rm", tmp_path / "never-made"):  # a stage that failed before making its folder leaves nothing
        pass
    assert not (tmp_path / "never-made").exists()
    monkeypatch.setenv("CHATFORGE_PUE", "lots")
    with pytest.raises(ChatforgeError, match="CHATFORGE_PUE"), measure("x", tmp_path):
        pass


def test_rapl_counter_gives_the_average_power(tmp_path, monkeypatch):
    readings = iter([1_000_000, 3_000_000])  # 2 J
    monkeypatch.setattr("chatforge.eval.energy.read_rapl_uj", lambda: next(readings))
    with measure("sft", tmp_path):
        time.sleep(0.2)
    e = json.loads((tmp_path / "energy.json").read_text())
    assert e["power_source"].startswith("RAPL")
    assert e["watts"] * e["seconds"] == pytest.approx(2.0, rel=0.05)


def test_run_kinds_and_the_errors_for_the_wrong_kind(pretrained, tmp_path, capsys):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "reward.json").write_text("{}")
    cls = tmp_path / "classify"
    cls.mkdir()
    (cls / "classifier.json").write_text("{}")
    assert run_kind(pretrained[0]) == "policy" and run_kind(rm) == "reward" and run_kind(cls) == "classifier"
    with pytest.raises(ChatforgeError, match="reward model"):
        require_policy(rm)
    with pytest.raises(ChatforgeError, match="classifier"):
        require_policy(cls)
    with pytest.raises(ChatforgeError, match="not a run folder"):
        run_kind(tmp_path / "rm" / "..")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--run", str(rm), "--data", "x"])
    assert e.value.code == 2 and "a reward model" in capsys.readouterr().err


def test_eval_of_one_run_from_the_command_line(pretrained, data_dir, capsys):
    main(["eval", "--run", str(pretrained[0]), "--data", str(data_dir)])
    out = capsys.readouterr().out
    bpb = float(out.split("eval: bpb ")[1].split()[0])
    assert math.isfinite(bpb) and bpb < load_meta(data_dir)["val_unigram_bpb"]
    assert evaluate_policy(pretrained[0]) == {}  # nothing asked, nothing measured
    with pytest.raises(SystemExit):
        main(["eval", "--run", str(pretrained[0])])
    assert "nothing to measure" in capsys.readouterr().err


def test_eval_judges_the_replies_with_a_users_own_task(sft_run, tasks, tmp_path, monkeypatch, capsys):
    """`chatforge eval --task module:function --group FIELD`: a task plugs in as a reward does, and its
    success is split by the field; the numbers are evaluate_task's with that task."""
    from chatforge.eval.suite import heldout_sample
    from chatforge.eval.task import Task, evaluate_task, load_task

    (tmp_path / "mytask.py").write_text("def short(row, reply):\n    return len(reply.split()) <= 6\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = str(tasks / "prompts_heldout.jsonl")
    main(["eval", "--run", str(sft_run[0]), "--prompts", prompts, "--n-prompts", "24", "--task", "mytask:short",
          "--group", "kind"])
    printed = dict(line.split()[1:3] for line in capsys.readouterr().out.splitlines() if line.startswith("eval: "))
    import mytask

    want = evaluate_task(load_run_model(sft_run[0]), load_tokenizer(sft_run[0]), heldout_sample(prompts, 24),
                         Task(mytask.short, lambda row: row["kind"]))
    for key in ("success", "success_en", "success_zh"):
        assert float(printed[key]) == pytest.approx(want[key], abs=1e-4), key
    assert load_task("chatforge.tasks.verse:TASK").group({"kind": "zh"}) == "zh"
    with pytest.raises(SystemExit) as e:
        main(["eval", "--run", str(sft_run[0]), "--prompts", prompts, "--task", "mytask:nothing"])
    assert e.value.code == 2 and "not a Task or a function" in capsys.readouterr().err


def test_demo_stages_are_skipped_when_complete_and_resumed_when_interrupted(tmp_path):
    calls = []

    def stage(resume):
        calls.append(resume)
        (tmp_path / "s").mkdir(exist_ok=True)
        (tmp_path / "s" / "eval.json").write_text('{"val_loss": 1.5}')

    assert run_stage("sft", tmp_path / "s", ["eval.json"], stage) == {"val_loss": 1.5} and calls == [None]
    assert run_stage("sft", tmp_path / "s", ["eval.json"], stage) == {"val_loss": 1.5} and calls == [None]
    assert json.loads((tmp_path / "s" / "energy.json").read_text())["stage"] == "sft"
    (tmp_path / "s" / "eval.json").unlink()
    (tmp_path / "s" / "checkpoints" / "step_40").mkdir(parents=True)  # interrupted after a checkpoint
    run_stage("sft", tmp_path / "s", ["eval.json"], stage)
    assert calls == [None, "latest"]
    (tmp_path / "s" / "eval.json").unlink()
    (tmp_path / "s" / "checkpoints" / "step_40").rmdir()
    (tmp_path / "s" / "half-written.bin").write_text("x")  # interrupted before any checkpoint: start again
    run_stage("sft", tmp_path / "s", ["eval.json"], stage)
    assert calls == [None, "latest", None] and not (tmp_path / "s" / "half-written.bin").exists()


@pytest.mark.learning
def test_eval_of_a_folder_of_runs_and_its_report(pretrained, sft_run, data_dir, tasks, tmp_path, capsys, measured):
    """`chatforge eval --run FOLDER` scores every model on the folder's held-out splits; the report shows them."""
    from chatforge.report.build import build_report
    from chatforge.report.tables import results_table

    folder = tmp_path / "runs"
    folder.mkdir()
    for name, target in (("pretrain", pretrained[0]), ("sft", sft_run[0]), ("data", data_dir), ("tasks", tasks)):
        (folder / name).symlink_to(target, target_is_directory=True)
    main(["eval", "--run", str(folder)])
    report = json.loads((folder / "eval.json").read_text())
    base, sft = report["models"]["base"], report["models"]["sft"]
    # SFT learned to end its reply; the base model rambles
    assert measured("end_rate_gain", sft["end_rate"] - base["end_rate"]) > 0.5
    assert base["bpb"] < load_meta(data_dir)["val_unigram_bpb"]
    assert 0 <= sft["choice_accuracy"] <= 1 and sft["toxic_rate"] == 0.0
    assert report["chance"]["choice"] == pytest.approx(0.25)
    assert len(report["samples"]) == 6 and set(report["samples"][0]["replies"]) == {"base", "sft"}
    assert json.loads((folder / "eval" / "energy.json").read_text())["stage"] == "eval"
    assert "eval: sft:" in capsys.readouterr().out
    html = build_report(folder).read_text(encoding="utf-8")
    assert "not run yet" in html and "<img" in html
    table = results_table(folder)
    assert "WordNet" in table and f"{100 * sft['choice_accuracy']:.1f}%" in table


def test_reward_model_win_rate_from_the_command_line(pretrained, sft_run, tasks, tmp_path, capsys):
    """win(A, B) counts strict wins: a run against itself wins 0%, and win(A, B) + win(B, A) <= 1."""
    from safetensors.torch import save_model

    from chatforge.config import config_to_dict
    from chatforge.model.classifier import Classifier

    rm = tmp_path / "rm"
    rm.mkdir()
    torch.manual_seed(0)
    scorer = Classifier(load_run_model(sft_run[0]), 1)  # an untrained head: any scorer will do here
    save_model(scorer, str(rm / "reward.safetensors"))
    (rm / "reward.json").write_text(json.dumps({"model": config_to_dict(scorer.body.cfg), "lora": None}))
    prompts = str(tasks / "prompts_heldout.jsonl")

    def win_rate(a, b) -> float:
        main(["eval", "--run", str(a), "--against", str(b), "--reward", str(rm), "--prompts", prompts,
              "--n-prompts", "40"])
        return float(capsys.readouterr().out.split("eval: rm_win_rate ")[1].split()[0])

    assert win_rate(sft_run[0], sft_run[0]) == 0.0
    assert win_rate(sft_run[0], pretrained[0]) + win_rate(pretrained[0], sft_run[0]) <= 1.0
    with pytest.raises(SystemExit):
        main(["eval", "--run", str(sft_run[0]), "--against", str(pretrained[0])])
    assert "--against needs --reward" in capsys.readouterr().err


def test_ranking_auc_is_the_share_of_success_failure_pairs_ranked_right():
    """AUC by hand: successes score [3, 1], failures [2, 1, 0] -> of 6 pairs, 3 > 2, 3 > 1, 3 > 0, 1 > 0
    win and 1 = 1 ties (half), 1 < 2 loses: 4.5 / 6 = 0.75. A perfect scorer gives 1, a reversed one 0."""
    from chatforge.eval.task import ranking_auc

    assert ranking_auc([3, 2, 1, 1, 0], [True, False, True, False, False]) == 0.75
    assert ranking_auc([5, 4, 1, 0], [True, True, False, False]) == 1.0
    assert ranking_auc([0, 1, 4, 5], [True, True, False, False]) == 0.0
    assert ranking_auc([1.0, 2.0], [True, True]) is None  # no failure to compare with


def test_evaluate_task_reports_the_reward_models_auc_on_its_own_replies(sft_run, tasks):
    """With a reward model, evaluate_task's rm_auc is ranking_auc of the scores it returns against the
    checker's verdicts on the same greedy replies. The tiny test model fails every prompt, so a stand-in
    checker (reply of even length) gives both verdicts; without a reward model there is no rm_auc."""
    import chatforge.eval.task as task
    from chatforge.model.classifier import Classifier

    def even_length(row, reply):
        return len(reply) % 2 == 0

    torch.manual_seed(0)
    model, tok = load_run_model(sft_run[0]), load_tokenizer(sft_run[0])
    scorer = Classifier(load_run_model(sft_run[0]), 1).eval()
    rows = task.load_prompts(str(tasks / "prompts_heldout.jsonl"))[:48]
    e = task.evaluate_task(model, tok, rows, task.Task(even_length), reward_model=scorer, max_new_tokens=48)
    assert len(e["scores"]) == len(rows) and 0 < e["success"] < 1
    rnd = task.sample_round(model, tok, rows, task.Sampling(temperature=0.0, max_new_tokens=48), 0)  # greedy: the same
    oks = [bool(done) and even_length(r, t) for r, t, done in zip(rnd.rows, rnd.texts, rnd.ended.tolist(), strict=True)]
    assert [s["reply"] for s in e["samples"]] == rnd.texts[: len(e["samples"])] and sum(oks) / len(rows) == e["success"]
    assert e["rm_auc"] == task.ranking_auc(e["scores"].tolist(), oks) and 0.0 <= e["rm_auc"] <= 1.0
    assert "rm_auc" not in task.evaluate_task(model, tok, rows[:8], task.Task(even_length), max_new_tokens=48)
