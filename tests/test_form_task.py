"""The RL task "verse in a form" (tasks/form.py): its gold judge and its held-out split."""

import json

import pytest

from chatforge.tasks.form import build_form_tasks, check, reward
from chatforge.tasks.verse import _held_out
from conftest import DEMO_CORPUS


def test_the_gold_judge_scores_the_requested_ending_and_form():
    question = {"kind": "form_en", "end": "?", "keyword": "Crown"}
    assert check(question, "Crown me with the laurel of thy love?")
    assert not check(question, "Crown me with the laurel of thy love.")  # the wrong mark
    assert not check(question, "Crown me, love?")  # under four words
    assert not check(question, "Crown me with thy love!?")  # two marks
    assert not check(question, "Crown me with the laurel\nof thy love?")  # two lines
    assert check(question, "What, shall we crown him then?")  # the keyword is not the judge's business
    five = {"kind": "form_zh", "end": "。", "length": 5, "keyword": "月"}
    assert check(five, "月落乌啼霜。") and not check(five, "月落乌啼霜，") and not check(five, "月落乌啼霜满天。")
    assert not check(five, "月落a啼霜。")
    assert reward("p", "Crown me with the laurel of thy love?", kind="form_en", end="?", keyword="Crown") == 1.0


@pytest.fixture(scope="module")
def form_tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("form")
    counts = build_form_tasks(DEMO_CORPUS, out)
    return out, counts


def test_demonstrations_meet_the_judge_and_held_out_keywords_stay_out(form_tasks):
    out, counts = form_tasks
    rows = {name: [json.loads(x) for x in (out / f"form_{name}.jsonl").read_text(encoding="utf-8").splitlines()]
            for name in ("sft", "rl", "heldout")}
    assert {k: len(v) for k, v in rows.items()} == {"sft": counts["form_sft"], "rl": counts["form_rl"],
                                                    "heldout": counts["form_heldout"]}
    assert all(check(r, r["completion"]) for r in rows["sft"])
    assert {r["kind"] for r in rows["heldout"]} == {"form_en", "form_zh"}  # both languages
    assert all(_held_out(r["keyword"], 0.2) for r in rows["heldout"])
    assert not any(_held_out(r["keyword"], 0.2) for r in rows["sft"] + rows["rl"])
    assert all(r["answers"] >= 1 for r in rows["heldout"])  # the corpus can answer every held-out prompt


def test_best_of_n_keeps_the_reward_models_favourite_of_the_first_n():
    from chatforge.eval.task import best_of_n

    scores, verdicts = [0.1, 0.9, 0.5, 0.2], [False, True, True, False]  # two prompts, two samples each
    assert best_of_n(scores, verdicts, 2, 1) == pytest.approx((0.5, 0.3))  # the first sample of each
    assert best_of_n(scores, verdicts, 2, 2) == pytest.approx((1.0, 0.7))  # the higher-scored one


def test_distinct_2_falls_when_replies_collapse_to_one_template():
    from chatforge.stages.rollout import distinct_2

    assert distinct_2(["a b a b"]) == pytest.approx(2 / 3)
    assert distinct_2(["the same line"] * 10) == pytest.approx(0.1)
    assert distinct_2(["月落乌啼霜满天"]) == 1.0  # Chinese: a character a unit


def test_pass_at_k_counts_a_prompt_once_any_sample_succeeds(sft_run, tasks):
    from chatforge.eval.task import Task, pass_at_k, ranking_auc
    from chatforge.model.io import load_run_model
    from chatforge.stages.rollout import load_prompt_rows
    from chatforge.tokenizer import load_tokenizer

    tok = load_tokenizer(sft_run[0])
    rows = load_prompt_rows(tasks / "prompts_heldout.jsonl", tok, 40)[:6]
    short = lambda row, reply: len(reply.split()) <= 4  # noqa: E731
    judge = load_run_model(sft_run[0])  # any scorer will do: the AUC is checked against its own definition
    from chatforge.model.classifier import Classifier

    scorer = Classifier(judge, 1).eval()
    out = pass_at_k(load_run_model(sft_run[0]), tok, rows, Task(short), k=4, max_new_tokens=16,
                    reward_model=scorer, more_reward_models={"again": scorer})
    verdicts = out["verdicts"]
    assert len(verdicts) == len(out["scores"]) == 24
    assert out["pass_at_4"] == sum(any(verdicts[i : i + 4]) for i in range(0, 24, 4)) / 6
    assert out["sample_success"] == sum(verdicts) / 24 <= out["pass_at_4"]
    assert out["rm_auc"] == ranking_auc(out["scores"], verdicts)
    assert out["again_auc"] == out["rm_auc"]  # a second reward model ranks the same samples


def test_evaluate_task_reports_each_group_of_a_task(sft_run, tasks):
    """A task's `group` splits its success: the form task's rows say "form_en" / "form_zh", and its group
    reads the language out of that."""
    from chatforge.eval.task import Task, evaluate_task
    from chatforge.model.io import load_run_model
    from chatforge.stages.rollout import load_prompt_rows
    from chatforge.tasks.form import TASK
    from chatforge.tokenizer import load_tokenizer

    tok = load_tokenizer(sft_run[0])
    rows = load_prompt_rows(tasks / "prompts_heldout.jsonl", tok, 40)[:6]  # evaluate_task keeps 6 samples
    rows = [r | {"kind": "form_en" if i % 2 else "form_zh"} for i, r in enumerate(rows)]
    even = lambda row, reply: len(reply) % 2 == 0  # noqa: E731
    out = evaluate_task(load_run_model(sft_run[0]), tok, rows, Task(even, TASK.group), max_new_tokens=16)
    oks = [bool(s["ok"]) for s in out["samples"]]
    assert out["success_en"] == sum(oks[1::2]) / 3 and out["success_zh"] == sum(oks[0::2]) / 3
    assert out["success"] == sum(oks) / 6
