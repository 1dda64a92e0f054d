"""Multiple-choice evaluation by log-likelihood, and the lm-evaluation-harness adapter, on held-out text."""

from __future__ import annotations

import gzip
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.eval.choice import choice_accuracy, continuation_logprobs, encode_pair, load_choices
from chatforge.model.io import load_run_model
from chatforge.model.transformer import Transformer
from chatforge.tokenizer import encode, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "data" / "demo" / "corpus.jsonl.gz"
LM_EVAL_TASKS = Path(__file__).parent / "data" / "lm_eval"


def heldout_lines(corpus: Path, seed: int = 0) -> list[str]:
    """English lines (7+ words) of demo documents the tiny model was not trained on, shuffled."""
    seen = {json.loads(line)["text"] for line in corpus.open(encoding="utf-8")}
    lines = []
    for line in gzip.open(DEMO_CORPUS, "rt", encoding="utf-8"):
        doc = json.loads(line)
        if doc["source"] in ("shakespeare", "kjv") and doc["text"] not in seen:
            lines += [x for x in doc["text"].split("\n") if 40 <= len(x) <= 100 and len(x.split()) >= 7]
    random.Random(seed).shuffle(lines)
    return lines


def heldout_mc(corpus: Path, n: int) -> list[dict]:
    """The first half of a held-out line, then its real second half or that half with its words shuffled:
    every choice has the same words (and so nearly the same tokens); only their order tells them apart."""
    rng, rows = random.Random(1), []
    for line in heldout_lines(corpus):
        words = line.split()
        question, rest = " ".join(words[: len(words) // 2]), words[len(words) // 2 :]
        right, choices = " " + " ".join(rest), set()
        for _ in range(50):
            choices |= {" " + " ".join(rng.sample(rest, len(rest)))} - {right}
            if len(choices) == 3:
                break
        if len(choices) < 3:
            continue
        choices, answer = sorted(choices), rng.randrange(4)
        choices.insert(answer, right)
        rows.append({"question": question, "choices": choices, "answer": answer})
        if len(rows) == n:
            return rows
    raise AssertionError("not enough held-out lines")


def direct_logprob(model: Transformer, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One sequence, no batching, no padding: log_softmax over the whole (left-truncated) sequence."""
    ids = (ctx + cont)[-(model.cfg.context + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
    total, greedy = 0.0, True
    for k, token in enumerate(cont):
        pos = len(ids) - 1 - len(cont) + k  # the input position that predicts cont[k]
        total += float(logp[pos, token])
        greedy &= int(logp[pos].argmax()) == token
    return total, greedy


def test_continuation_logprobs_match_direct_computation(pretrained, corpus):
    model, tok = load_run_model(pretrained[0]), load_tokenizer(pretrained[0])
    lines = heldout_lines(corpus)
    pairs = [encode_pair(tok, x[:20], x[20 : 20 + k]) for x, k in zip(lines, (1, 3, 9, 25, 60), strict=False)]
    long_ctx = encode(tok, " ".join(lines[:20]))
    assert len(long_ctx) > model.cfg.context  # this one is cut from the left
    pairs.append((long_ctx, encode(tok, " and so")))
    # a continuation the model would write itself (greedy), and the same one with its last token changed
    ctx = pairs[0][0]
    greedy_cont: list[int] = []
    for _ in range(4):
        with torch.no_grad():
            greedy_cont.append(int(model(torch.tensor([ctx + greedy_cont]))[0, -1].argmax()))
    pairs += [(ctx, greedy_cont), (ctx, greedy_cont[:-1] + [(greedy_cont[-1] + 1) % model.cfg.vocab_size])]
    got = continuation_logprobs(model, pairs, batch_size=4)  # rows of different lengths share batches
    want = [direct_logprob(model, list(c), list(x)) for c, x in pairs]
    for (lp, greedy), (lp_want, greedy_want) in zip(got, want, strict=True):
        assert lp == pytest.approx(lp_want, abs=1e-4)
        assert greedy == greedy_want
    assert got[-2][1] is True and got[-1][1] is False
    assert all(lp < 0 for lp, _ in got)


@pytest.mark.learning
def test_trained_model_beats_chance_and_random_model_does_not(pretrained, corpus, measured):
    rows = heldout_mc(corpus, 120)
    tok = load_tokenizer(pretrained[0])
    trained = choice_accuracy(load_run_model(pretrained[0]), tok, rows)
    torch.manual_seed(0)
    untrained = choice_accuracy(Transformer(load_run_model(pretrained[0]).cfg).eval(), tok, rows)
    print(f"held-out continuation MC ({len(rows)} questions): trained {trained}, untrained {untrained}")
    assert trained["n"] == untrained["n"] == 120 and trained["chance"] == pytest.approx(0.25)
    assert measured("trained_accuracy", trained["accuracy"]) >= 0.45  # chance 0.25: 120 guesses reach 0.35 1 in ~100
    assert untrained["accuracy"] <= 0.37
    assert measured("trained_minus_untrained", trained["accuracy"] - untrained["accuracy"]) > 0.15


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"question": "2 + 2 =", "choices": [" 3", " 4"], "answer": 1}


@pytest.mark.parametrize(("bad", "names"), [
    ({**GOOD, "answer": 5}, ['"answer" is 5 but there are 2 choices (0..1)']),
    ({**GOOD, "answer": "1"}, ['"answer" must be']),
    ({k: v for k, v in GOOD.items() if k != "question"}, ['"question"']),
    ({**GOOD, "choices": " 3 | 4"}, ['"choices" must be a list of strings']),
    ({k: v for k, v in GOOD.items() if k != "choices"}, ['"choices"', "no such key"]),
    ({**GOOD, "choices": [" 4"], "answer": 0}, ['"choices" has 1 choice']),
    ("{not json", ["not valid JSON"]),
])
def test_bad_rows_name_file_line_and_key(tmp_path, bad, names):
    path = write_jsonl(tmp_path / "bench.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(ChatforgeError) as e:
        load_choices(path)
    for name in [f"{path}:3:", *names]:
        assert name in str(e.value)


def test_load_choices_reads_good_rows_and_rejects_an_empty_file(tmp_path):
    assert load_choices(write_jsonl(tmp_path / "ok.jsonl", [GOOD, {**GOOD, "answer": 0, "id": 7}]))[1]["id"] == 7
    with pytest.raises(ChatforgeError, match="no questions"):
        load_choices(write_jsonl(tmp_path / "empty.jsonl", []))
    rows = load_choices(REPO / "data" / "bench" / "wordnet_gloss.jsonl")  # the shipped benchmark is well-formed
    assert len(rows) == 300 and all(len(r["choices"]) == 4 and r["choices"][r["answer"]][0] == " " for r in rows)


def test_importing_chatforge_does_not_import_lm_eval():
    code = ("import sys, chatforge, chatforge.cli, chatforge.eval.choice; "
            "sys.exit(1 if 'lm_eval' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_missing_lm_eval_is_a_chatforge_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    monkeypatch.delitem(sys.modules, "chatforge.eval.lm_eval_adapter", raising=False)
    with pytest.raises(ChatforgeError, match=r'pip install -e "\.\[eval\]"'):
        import chatforge.eval.lm_eval_adapter  # noqa: F401


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, and the datasets cache in tmp_path."""
    for name, value in [("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"),
                        ("HF_DATASETS_CACHE", str(tmp_path / "hf_cache")), ("HF_HOME", str(tmp_path / "hf_home"))]:
        monkeypatch.setenv(name, value)
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def reference_logprob(model: Transformer, eot: int, tokens: list[int]) -> float:
    """log p(text): each chunk of `context` tokens predicted in one pass, from up to `context` tokens before
    its end (the first from <|endoftext|>); lm-eval's rolling windows, written out without lm-eval."""
    padded, c, total = [eot] + tokens, model.cfg.context, 0.0
    for a in range(0, len(tokens), c):
        b = min(a + c, len(tokens))
        start = max(0, b - c)
        total += direct_logprob(model, padded[start : a + 1], tokens[a:b])[0]
    return total


def test_lm_eval_adapter_matches_our_numbers(pretrained, corpus, tmp_path, offline):
    from chatforge.eval.lm_eval_adapter import ChatforgeLM, run_lm_eval
    from chatforge.model.generate import Sampling, generate_text

    run = pretrained[0]
    model, tok = load_run_model(run), load_tokenizer(run)
    # shuffled-word choices; then choices of different lengths (other lines' ends), where acc_norm differs
    ends = [(r, r["choices"][r["answer"]]) for r in heldout_mc(corpus, 60)[40:]]
    other = [{**row, "choices": [" " + ends[(i + 1) % 20][1].split()[0], ends[(i + 2) % 20][1] + ends[(i + 3) % 20][1],
                                 ends[(i + 3) % 20][1]]} for i, (row, _) in enumerate(ends)]  # 1 word, 2 ends, 1 end
    for (row, right), new in zip(ends, other, strict=True):
        new["choices"].insert(row["answer"], right)
    mc = load_choices(write_jsonl(tmp_path / "tiny_mc.jsonl", heldout_mc(corpus, 40) + other))
    lines = heldout_lines(corpus, seed=2)
    texts = ["\n".join(lines[8 * i : 8 * i + 8]) for i in range(5)]
    write_jsonl(tmp_path / "tiny_text.jsonl", [{"text": t} for t in texts])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for yaml in LM_EVAL_TASKS.glob("*.yaml"):
        (tasks / yaml.name).write_text(yaml.read_text().replace("__DATA__", str(tmp_path)))
    results = run_lm_eval(run, ["chatforge_tiny_mc", "chatforge_tiny_text", "chatforge_tiny_gen"],
                          include_path=str(tasks), limit=None, batch_size=8)

    ours = choice_accuracy(model, tok, mc)
    print(f"lm-eval: {results}\nours: {ours}")
    assert results["chatforge_tiny_mc"]["acc,none"] == pytest.approx(ours["accuracy"], abs=1e-9)
    assert results["chatforge_tiny_mc"]["acc_norm,none"] == pytest.approx(ours["accuracy_norm"], abs=1e-9)
    assert ours["accuracy_norm"] > ours["accuracy"]  # one-word distractors win sums of log p, not per byte

    eot = tok.token_to_id("<|endoftext|>")
    token_lists = [encode(tok, t) for t in texts]
    assert min(map(len, token_lists)) > 2 * model.cfg.context  # every text spans 3+ windows
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    bpb = -sum(reference_logprob(model, eot, ids) for ids in token_lists) / n_bytes / math.log(2)
    uniform_bpb = sum(map(len, token_lists)) * math.log2(model.cfg.vocab_size) / n_bytes
    got_bpb = results["chatforge_tiny_text"]["bits_per_byte,none"]
    assert math.isfinite(got_bpb) and got_bpb == pytest.approx(bpb, rel=1e-4)
    assert got_bpb < 0.75 * uniform_bpb  # a trained model predicts held-out text far better than guessing

    s = Sampling(temperature=0.0, max_new_tokens=12, stop=["\n"])
    replies = [generate_text(model, tok, row["question"], s) for row in mc]
    assert results["chatforge_tiny_gen"]["exact_match,none"] == pytest.approx(
        sum(r == row["choices"][row["answer"]] for r, row in zip(replies, mc, strict=True)) / len(mc))
    from lm_eval.api.registry import get_model

    lm = get_model("chatforge").create_from_arg_string(f"run={run},batch_size=8", {"batch_size": 64, "device": None})
    assert isinstance(lm, ChatforgeLM) and lm.batch_size == 8  # model_args win over lm_eval's --batch_size
    requests = [SimpleNamespace(args=(row["question"], {"until": ["\n"], "max_gen_toks": 12})) for row in mc[:8]]
    got = lm.generate_until(requests)
    assert got == replies[:8] and all(isinstance(x, str) and "\n" not in x for x in got) and any(got)


def test_unknown_lm_eval_task_or_no_run_is_a_chatforge_error(pretrained, tmp_path, offline):
    from chatforge.eval.lm_eval_adapter import ChatforgeLM, run_lm_eval

    with pytest.raises(ChatforgeError, match="no_such_task_xyz.*" + str(tmp_path)):
        run_lm_eval(pretrained[0], ["no_such_task_xyz"], include_path=str(tmp_path), limit=2, batch_size=4)
    with pytest.raises(ChatforgeError, match="run=DIR"):
        ChatforgeLM.create_from_arg_string("batch_size=4")
