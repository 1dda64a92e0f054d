"""`chatforge demo`: the whole pipeline on the bundled demo corpus, each stage's held-out numbers printed
and collected in runs/demo/results.json."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from chatforge.config import load_config
from chatforge.data.readers import iter_corpus
from chatforge.data.shards import prepare
from chatforge.errors import ChatforgeError
from chatforge.eval.task import evaluate_task, load_prompts, reward_model_scores
from chatforge.model.generate import Sampling, stream_text
from chatforge.model.io import load_run_model
from chatforge.stages.classify import run_classify
from chatforge.stages.dpo import run_dpo
from chatforge.stages.grpo import run_grpo
from chatforge.stages.ppo import run_ppo
from chatforge.stages.pretrain import run_pretrain
from chatforge.stages.reward import load_reward_model, run_reward
from chatforge.stages.sft import run_sft
from chatforge.tasks.verse import build_source_labels, build_tasks
from chatforge.tokenizer import load_tokenizer, render_chat, save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "demo" / "corpus.jsonl.gz"
PROMPTS = ["ROMEO:\n", "And God said, ", "床前明月光，"]
EVAL_PROMPTS = 200  # held-out task prompts scored for every stage
ALIGNERS = ("ppo", "dpo", "grpo")


def timed(results: dict, name: str, fn, *args, **kwargs):
    t = time.perf_counter()
    value = fn(*args, **kwargs)
    results[f"{name}_seconds"] = round(time.perf_counter() - t, 1)
    return value


def run_demo(out: str | Path = "runs/demo", config: str | None = None, overrides: list[str] | None = None,
             align: tuple[str, ...] = ("ppo",)) -> dict:
    """`align`: which of ppo, dpo, grpo to run after the reward model (in that order)."""
    out = Path(out)
    unknown = set(align) - set(ALIGNERS)
    if unknown:
        raise ChatforgeError(f"demo: unknown alignment method(s) {sorted(unknown)}; choose from {', '.join(ALIGNERS)}")
    if not CORPUS.is_file():
        raise ChatforgeError(f"{CORPUS}: the demo corpus is missing; rebuild it with scripts/build_demo_data.py")
    if out.exists():
        print(f"demo: starting afresh, removing the previous demo run in {out}")
        shutil.rmtree(out)
    t0, r = time.perf_counter(), {}

    print("== 1/8 tokenizer: byte-level BPE on the demo corpus")
    timed(r, "tokenizer", lambda: save_tokenizer(train_tokenizer(iter_corpus([CORPUS]), 4096), out / "tokenizer"))

    print("== 2/8 prepare: token shards, split by document")
    meta = timed(r, "prepare", prepare, [str(CORPUS)], out / "tokenizer", out / "data")
    print(f"   train {meta['train']['tokens']:,} tokens, val {meta['val']['tokens']:,} tokens; "
          f"unigram baseline {meta['val_unigram_bpb']:.3f} bits/byte")

    print("== 3/8 pretrain")
    cfg = load_config(config or REPO / "configs" / "demo.toml", [f"data.dir={out / 'data'}", *(overrides or [])])
    pre = timed(r, "pretrain", run_pretrain, cfg, out / "pretrain")
    r.update(val_bpb=pre["val_bpb"], val_loss=pre["val_loss"], unigram_bpb=pre["val_unigram_bpb"], params=pre["params"])
    model, tok = load_run_model(out / "pretrain"), load_tokenizer(out / "pretrain")
    print(f"   held-out: {pre['val_loss']:.3f} nats/token, {pre['val_bpb']:.3f} bits/byte (unigram baseline "
          f"{pre['val_unigram_bpb']:.3f}) in {r['pretrain_seconds']:.0f}s")
    for i, prompt in enumerate(PROMPTS):
        text = "".join(stream_text(model, tok, prompt, Sampling(max_new_tokens=50, top_p=0.95, seed=i)))
        print(f"   --- {prompt!r}\n{prompt}{text}")

    print("== 4/8 tasks: verse on request, from real corpus lines; held-out keywords")
    tasks = out / "tasks"
    counts = {**build_tasks(CORPUS, tasks), **build_source_labels(CORPUS, tasks)}
    print("   " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))

    print("== 5/8 sft: assistant-only loss on the instructions")
    sft_cfg = load_config(REPO / "configs" / "demo-sft.toml")
    sft = timed(r, "sft", run_sft, sft_cfg, out / "pretrain", tasks / "sft_train.jsonl", out / "sft",
                tasks / "sft_val.jsonl")
    rows = load_prompts(tasks / "prompts_heldout.jsonl")
    rows = random.Random(0).sample(rows, min(EVAL_PROMPTS, len(rows)))
    for name, run in (("base", out / "pretrain"), ("sft", out / "sft")):
        e = timed(r, f"eval_{name}", evaluate_task, load_run_model(run), tok, rows)
        r[f"{name}_success"], r[f"{name}_end_rate"] = e["success"], e["end_rate"]
        print(f"   {name}: on {e['n']} held-out prompts, constraint success {e['success']:.1%}, "
              f"replies ending with <|im_end|> {e['end_rate']:.1%}")
    r["sft_val_loss"] = sft.get("val_loss")
    chat_model = load_run_model(out / "sft")
    for row in rows[:4]:
        prompt = render_chat([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
        reply = "".join(stream_text(chat_model, tok, prompt, Sampling(temperature=0, max_new_tokens=40)))
        print(f"   user: {row['prompt']}\n   assistant: {reply}")

    print("== 6/8 rm: a reward model from the SFT model, on preference pairs (Bradley-Terry)")
    rm = timed(r, "rm", run_reward, load_config(REPO / "configs" / "demo-rm.toml"), out / "sft",
               tasks / "prefs_train.jsonl", tasks / "prefs_val.jsonl", out / "rm")
    r["rm_accuracy"] = rm["val_accuracy"]
    print(f"   held-out pairwise accuracy {rm['val_accuracy']:.1%} on {rm['val_pairs']} pairs (chance 50%)")

    print(f"== 7/8 align: {', '.join(align) or 'none'} from the SFT model; held-out constraint success, KL to SFT")
    rm_model = load_reward_model(out / "rm")
    sft_scores = reward_model_scores(load_run_model(out / "sft"), rm_model, tok, rows)
    r["sft_rm_score"] = sft_scores.mean().item()
    runners = {
        "ppo": lambda: run_ppo(load_config(REPO / "configs" / "demo-ppo.toml"), out / "sft",
                               tasks / "prompts_train.jsonl", out / "ppo", out / "rm", tasks / "prompts_heldout.jsonl"),
        "grpo": lambda: run_grpo(load_config(REPO / "configs" / "demo-grpo.toml"), out / "sft",
                                 tasks / "prompts_train.jsonl", out / "grpo", None, tasks / "prompts_heldout.jsonl"),
        "dpo": lambda: run_dpo(load_config(REPO / "configs" / "demo-dpo.toml"), out / "sft",
                               tasks / "prefs_train.jsonl", tasks / "prefs_val.jsonl", out / "dpo"),
    }
    for name in (a for a in ALIGNERS if a in align):
        result = timed(r, name, runners[name])
        model = load_run_model(out / name)
        e = evaluate_task(model, tok, rows)
        scores = reward_model_scores(model, rm_model, tok, rows)
        r[f"{name}_success"], r[f"{name}_end_rate"] = e["success"], e["end_rate"]
        r[f"{name}_rm_score"] = scores.mean().item()
        r[f"{name}_rm_win_rate"] = (scores > sft_scores).float().mean().item()
        extra = ""
        if "val_kl" in result:  # an RL run: its reward on each round's fresh prompts, first and last five logged steps
            log = [json.loads(line) for line in (out / name / "metrics.jsonl").open()]
            rewards = [row["reward"] for row in log if "reward" in row]
            r[f"{name}_reward_first"], r[f"{name}_reward_last"] = rewards[0], sum(rewards[-5:]) / len(rewards[-5:])
            r[f"{name}_kl"] = result["val_kl"]
            extra = (f", training reward {rewards[0]:.2f} -> {r[f'{name}_reward_last']:.2f}, "
                     f"KL to SFT {result['val_kl']:.2f} nats/reply")
        if "val_reward_accuracy" in result:
            r[f"{name}_preference_accuracy"] = result["val_reward_accuracy"]
            extra = f", held-out implicit-reward accuracy {result['val_reward_accuracy']:.1%}"
        print(f"   {name}: constraint success {e['success']:.1%} (SFT {r['sft_success']:.1%}); reward-model score "
              f"{r[f'{name}_rm_score']:.2f} (SFT {r['sft_rm_score']:.2f}), beats SFT's reply on "
              f"{r[f'{name}_rm_win_rate']:.0%} of prompts{extra}; {r[f'{name}_seconds']:.0f}s")
    r["align_seconds"] = round(sum(r.get(f"{a}_seconds", 0) for a in align), 1)

    print("== 8/8 classify: which source is this line from?")
    cls = timed(r, "classify", run_classify, load_config(REPO / "configs" / "demo-classify.toml"), out / "pretrain",
                tasks / "classify_train.jsonl", tasks / "classify_val.jsonl", out / "classify")
    r.update(classify_accuracy=cls["val_accuracy"], classify_majority=cls["majority_baseline"])
    print(f"   held-out accuracy {cls['val_accuracy']:.1%} (majority class {cls['majority_baseline']:.1%})")

    r["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    chat_run = out / align[0] if align else out / "sft"
    print(f"== demo done in {r['total_seconds']:.0f}s; numbers in {out}/results.json. Chat with it:\n"
          f"   .venv/bin/chatforge chat --run {chat_run}\n"
          f"   .venv/bin/chatforge serve --run {out}     # web chat + arena of every model: http://127.0.0.1:8000/")
    return r
