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
from chatforge.eval.task import evaluate_task, load_prompts
from chatforge.model.generate import Sampling, stream_text
from chatforge.model.io import load_run_model
from chatforge.stages.classify import run_classify
from chatforge.stages.pretrain import run_pretrain
from chatforge.stages.reward import run_reward
from chatforge.stages.sft import run_sft
from chatforge.tasks.verse import build_source_labels, build_tasks
from chatforge.tokenizer import load_tokenizer, render_chat, save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "demo" / "corpus.jsonl.gz"
PROMPTS = ["ROMEO:\n", "And God said, ", "床前明月光，"]
EVAL_PROMPTS = 200  # held-out task prompts scored for base and SFT


def timed(results: dict, name: str, fn, *args, **kwargs):
    t = time.perf_counter()
    value = fn(*args, **kwargs)
    results[f"{name}_seconds"] = round(time.perf_counter() - t, 1)
    return value


def run_demo(out: str | Path = "runs/demo", config: str | None = None, overrides: list[str] | None = None) -> dict:
    out = Path(out)
    if not CORPUS.is_file():
        raise ChatforgeError(f"{CORPUS}: the demo corpus is missing; rebuild it with scripts/build_demo_data.py")
    if out.exists():
        print(f"demo: starting afresh, removing the previous demo run in {out}")
        shutil.rmtree(out)
    t0, r = time.perf_counter(), {}

    print("== 1/7 tokenizer: byte-level BPE on the demo corpus")
    timed(r, "tokenizer", lambda: save_tokenizer(train_tokenizer(iter_corpus([CORPUS]), 4096), out / "tokenizer"))

    print("== 2/7 prepare: token shards, split by document")
    meta = timed(r, "prepare", prepare, [str(CORPUS)], out / "tokenizer", out / "data")
    print(f"   train {meta['train']['tokens']:,} tokens, val {meta['val']['tokens']:,} tokens; "
          f"unigram baseline {meta['val_unigram_bpb']:.3f} bits/byte")

    print("== 3/7 pretrain")
    cfg = load_config(config or REPO / "configs" / "demo.toml", [f"data.dir={out / 'data'}", *(overrides or [])])
    pre = timed(r, "pretrain", run_pretrain, cfg, out / "pretrain")
    r.update(val_bpb=pre["val_bpb"], val_loss=pre["val_loss"], unigram_bpb=pre["val_unigram_bpb"], params=pre["params"])
    model, tok = load_run_model(out / "pretrain"), load_tokenizer(out / "pretrain")
    print(f"   held-out: {pre['val_loss']:.3f} nats/token, {pre['val_bpb']:.3f} bits/byte (unigram baseline "
          f"{pre['val_unigram_bpb']:.3f}) in {r['pretrain_seconds']:.0f}s")
    for i, prompt in enumerate(PROMPTS):
        text = "".join(stream_text(model, tok, prompt, Sampling(max_new_tokens=50, top_p=0.95, seed=i)))
        print(f"   --- {prompt!r}\n{prompt}{text}")

    print("== 4/7 tasks: verse on request, from real corpus lines; held-out keywords")
    tasks = out / "tasks"
    counts = {**build_tasks(CORPUS, tasks), **build_source_labels(CORPUS, tasks)}
    print("   " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))

    print("== 5/7 sft: assistant-only loss on the instructions")
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

    print("== 6/7 rm: a reward model from the SFT model, on preference pairs (Bradley-Terry)")
    rm = timed(r, "rm", run_reward, load_config(REPO / "configs" / "demo-rm.toml"), out / "sft",
               tasks / "prefs_train.jsonl", tasks / "prefs_val.jsonl", out / "rm")
    r["rm_accuracy"] = rm["val_accuracy"]
    print(f"   held-out pairwise accuracy {rm['val_accuracy']:.1%} on {rm['val_pairs']} pairs (chance 50%)")

    print("== 7/7 classify: which source is this line from?")
    cls = timed(r, "classify", run_classify, load_config(REPO / "configs" / "demo-classify.toml"), out / "pretrain",
                tasks / "classify_train.jsonl", tasks / "classify_val.jsonl", out / "classify")
    r.update(classify_accuracy=cls["val_accuracy"], classify_majority=cls["majority_baseline"])
    print(f"   held-out accuracy {cls['val_accuracy']:.1%} (majority class {cls['majority_baseline']:.1%})")

    r["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    print(f"== demo done in {r['total_seconds']:.0f}s; numbers in {out}/results.json. Chat with it:\n"
          f"   .venv/bin/chatforge chat --run {out}/sft")
    return r
