"""SFT, LoRA, classification and the chat REPL on the session's small pre-trained model."""

import io
import json
import re

import pytest
import torch

from chatforge.chat import chat_loop
from chatforge.errors import ChatforgeError
from chatforge.eval.task import evaluate_task, load_prompts
from chatforge.model.generate import Sampling
from chatforge.model.io import load_run_model
from chatforge.model.lora import LoRAConfig, apply_lora, merge_lora
from chatforge.stages.classify import confusion, load_classifier, load_labelled, predict, run_classify
from chatforge.stages.sft import run_sft
from chatforge.tasks.verse import TASK, check, corpus_lines
from chatforge.tokenizer import load_tokenizer
from conftest import DEMO_CORPUS, REPO, learning_config, sft_config


def test_task_rows_are_real_answers_and_keywords_held_out(tasks):
    train = [json.loads(line) for line in (tasks / "sft_train.jsonl").open()]
    held = load_prompts(tasks / "prompts_heldout.jsonl")
    assert all(check(r, r["completion"]) for r in train)
    assert not {r["keyword"] for r in train} & {r["keyword"] for r in held}
    assert {r["kind"] for r in held} == {"en", "zh"}
    row = {"kind": "zh", "keyword": "月", "length": 5}
    assert check(row, "月落乌啼霜") and not check(row, "落月乌啼霜") and not check(row, "月落乌啼霜满天")


def test_copy_rows_rl_prompts_and_rl_pairs_never_ask_for_a_held_out_keyword(tasks):
    held = load_prompts(tasks / "prompts_heldout.jsonl")
    held_keywords = {r["keyword"].lower() for r in held}
    copy_train = [json.loads(line) for line in (tasks / "copy_train.jsonl").open(encoding="utf-8")]
    copy_val = load_prompts(tasks / "copy_val.jsonl")
    assert len(copy_train) > 40_000 and len(copy_val) == 200
    zh_train = [r["completion"] for r in copy_train if "Repeat" not in r["prompt"]]
    assert 0.2 < len(zh_train) / len(copy_train) < 0.3  # Chinese is a quarter of the rows, not its natural 4%
    assert sum("Repeat" in r["prompt"] for r in copy_val) == 100  # held-out lines: half English, half Chinese
    zh_real = set(corpus_lines(DEMO_CORPUS)[1])
    shuffled = [x for x in zh_train if x not in zh_real]
    assert len(shuffled) > 2 * len(zh_train) / 3 - 100  # three shuffles of each real line (a few are real lines)
    assert not {r["completion"] for r in copy_train} & {r["completion"] for r in copy_val}
    for r in copy_train + copy_val:
        assert r["completion"] in r["prompt"] and check(r, r["completion"]) and not check(r, r["completion"][:-1])
        first = (re.findall(r"[a-z]+|[\u4e00-\u9fff]", r["completion"].lower()) or [""])[0]
        assert first not in held_keywords  # no copied line begins with one
    rl = load_prompts(tasks / "prompts_rl.jsonl")
    train_keywords = {json.loads(line)["keyword"] for line in (tasks / "sft_train.jsonl").open(encoding="utf-8")}
    fresh = [r for r in rl if r["kind"] == "en"]
    assert len(fresh) == 1500 and all(1 <= r["answers"] <= 3 for r in fresh)
    assert not {r["keyword"] for r in fresh} & (train_keywords | {r["keyword"] for r in held})
    fresh_zh = [r for r in rl if r["kind"] == "zh"]
    assert len(fresh_zh) == 1000 and all(r["answers"] <= 1 for r in fresh_zh)
    assert not {r["keyword"] for r in fresh_zh} & (train_keywords | {r["keyword"] for r in held})
    # DPO's pairs on those keywords: a real answer above a real line that breaks the prompt
    by_prompt = {r["prompt"]: r for r in rl}
    pairs = [json.loads(line) for line in (tasks / "prefs_rl.jsonl").open(encoding="utf-8")]
    assert len(pairs) > 2000 and {"写" in p["prompt"] for p in pairs} == {True, False}
    for p in pairs:
        assert check(by_prompt[p["prompt"]], p["chosen"]) and not check(by_prompt[p["prompt"]], p["rejected"])
    rm_pairs = (tasks / "prefs_rm.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rm_pairs) == len(pairs) + len((tasks / "prefs_train.jsonl").read_text(encoding="utf-8").splitlines())


@pytest.mark.learning
@pytest.mark.smoke
def test_sft_model_ends_its_replies_and_the_base_model_does_not(pretrained, sft_run, tasks, measured):
    rows = load_prompts(tasks / "prompts_heldout.jsonl")[:40]
    tok = load_tokenizer(sft_run[0])
    base = evaluate_task(load_run_model(pretrained[0]), tok, rows, TASK, max_new_tokens=32)
    sft = evaluate_task(load_run_model(sft_run[0]), tok, rows, TASK, max_new_tokens=32)
    assert measured("sft_end_rate", sft["end_rate"]) >= 0.95 and measured("base_end_rate", base["end_rate"]) <= 0.5
    assert measured("sft_minus_base_success", sft["success"] - base["success"]) >= 0
    assert measured("sft_val_loss", sft_run[1]["val_loss"]) < 6.0  # on held-out keywords' answers


def test_lora_trains_adapters_only_and_merges_exactly(pretrained, tasks, tmp_path):
    base = load_run_model(pretrained[0])
    out = tmp_path / "lora"
    cfg = sft_config("train.steps=30", "lora.r=4", "lora.targets=q,k,v,o,up,down,gate", "train.eval_every=1000")
    result = run_sft(cfg, pretrained[0], tasks / "sft_train.jsonl", out)
    assert {p.name for p in out.iterdir()} >= {"adapter.safetensors", "adapter.json"}
    assert not (out / "model.safetensors").exists()
    assert (out / "adapter.safetensors").stat().st_size < (pretrained[0] / "model.safetensors").stat().st_size / 4
    assert result["trainable_params"] < base.num_params() / 10
    adapted = load_run_model(out)
    frozen = {k: v for k, v in adapted.state_dict().items() if "lora_" not in k}
    for name, tensor in base.state_dict().items():  # the base weights did not move, bit for bit
        key = name if name in frozen else name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(frozen[key], tensor), name
    ids = torch.randint(0, base.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        lora_logits = adapted(ids)
        assert not torch.allclose(lora_logits, base(ids), atol=1e-4)  # training moved the adapters
        merged = merge_lora(adapted)(ids)
    assert torch.allclose(merged, lora_logits, atol=1e-5)


def test_lora_at_init_is_exactly_the_base_model(pretrained):
    base = load_run_model(pretrained[0])
    adapted = load_run_model(pretrained[0])
    apply_lora(adapted, LoRAConfig(r=8, targets="q,k,v,o,up,down,gate"))
    ids = torch.randint(0, base.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(adapted(ids), base(ids))


@pytest.mark.learning
def test_classifier_beats_the_majority_class_on_held_out_lines(pretrained, tasks, tmp_path, measured):
    cfg = learning_config(REPO / "configs" / "demo-classify.toml", ["train.steps=60", "train.eval_every=1000"])
    out = tmp_path / "cls"
    result = run_classify(cfg, pretrained[0], tasks / "classify_train.jsonl", tasks / "classify_val.jsonl", out)
    assert measured("accuracy_over_majority", result["val_accuracy"] - result["majority_baseline"]) > 0.3
    assert sum(map(sum, result["confusion"])) == len((tasks / "classify_val.jsonl").read_text().splitlines())
    (label, p), = predict(out, ["床前明月光"])
    assert label == "poem" and 0 < p <= 1


def test_a_lora_classifier_loads_back_as_trained_and_a_finished_run_is_never_overwritten(pretrained, tasks,
                                                                                         tmp_path):
    """A classifier trained with adapters loads back with them (it once failed: the loader ignored LoRA) and
    predicts the held-out lines exactly as at the end of training; training again into its folder without
    --resume stops, as every stage does (the shared loop's guard)."""
    cfg = learning_config(REPO / "configs" / "demo-classify.toml", ["train.steps=3", "train.eval_every=1000",
                                                                    "lora.r=4", "classify.freeze=head"])
    out = tmp_path / "cls_lora"
    result = run_classify(cfg, pretrained[0], tasks / "classify_train.jsonl", tasks / "classify_val.jsonl", out)
    model, labels = load_classifier(out)
    assert any("lora" in name for name, _ in model.named_parameters())
    texts, ys = load_labelled(tasks / "classify_val.jsonl", labels)
    accuracy, matrix = confusion(model, load_tokenizer(out), texts, ys, labels, model.body.cfg.context, "cpu")
    assert (accuracy, matrix) == (result["val_accuracy"], result["confusion"])
    with pytest.raises(ChatforgeError, match="already here"):
        run_classify(cfg, pretrained[0], tasks / "classify_train.jsonl", tasks / "classify_val.jsonl", out)


@pytest.mark.smoke
def test_chat_repl_commands_and_multi_turn(sft_run):
    model, tok = load_run_model(sft_run[0]), load_tokenizer(sft_run[0])
    inputs = iter(["Write a line that begins with the word \"Love\".", "/system Be brief.", "写一句诗", "/bogus",
                   "/reset", "again", "/quit", "never read"])
    out = io.StringIO()
    messages = chat_loop(model, tok, Sampling(temperature=0, max_new_tokens=24), read=lambda _: next(inputs), out=out)
    text = out.getvalue()
    assert text.count("assistant> ") == 3 and "(conversation reset)" in text and "unknown command /bogus" in text
    assert [m["role"] for m in messages] == ["system", "user", "assistant"] and messages[1]["content"] == "again"
    assert next(inputs) == "never read"


def test_sft_killed_and_resumed_logs_identical_losses(pretrained, tasks, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    args = ["sft", "--init", str(pretrained[0]), "--data", str(tasks / "sft_train.jsonl"),
            "--config", str(REPO / "configs" / "demo-sft.toml"), "train.steps=16", "train.checkpoint_every=8",
            "train.log_every=1", "train.eval_every=1000", "train.precision=fp32", "train.batch_size=64"]

    def losses(run):
        return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert subprocess.run([sys.executable, "-m", "chatforge", *args, "--out", str(straight)], cwd=REPO,
                          capture_output=True, timeout=300).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "chatforge", *args, "--out", str(killed)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (killed / "checkpoints" / "step_8").is_dir() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "step_16").exists(), "the run finished before it could be killed"
    done = subprocess.run([sys.executable, "-m", "chatforge", *args, "--out", str(killed), "--resume"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    a, b = losses(straight), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 17)) and all(abs(a[s] - b[s]) <= 1e-6 for s in a)
