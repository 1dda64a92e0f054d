"""`chatforge demo`: the whole pipeline on the bundled demo corpus, each stage's numbers printed."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from chatforge.config import load_config
from chatforge.data.readers import iter_corpus
from chatforge.data.shards import prepare
from chatforge.errors import ChatforgeError
from chatforge.model.generate import Sampling, stream_text
from chatforge.model.io import load_run_model
from chatforge.stages.pretrain import run_pretrain
from chatforge.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "demo" / "corpus.jsonl.gz"
PROMPTS = ["ROMEO:\n", "And God said, ", "床前明月光，", "To be, or not to be"]


def run_demo(out: str | Path = "runs/demo", config: str | None = None, overrides: list[str] | None = None) -> dict:
    out = Path(out)
    if not CORPUS.is_file():
        raise ChatforgeError(f"{CORPUS}: the demo corpus is missing; rebuild it with scripts/build_demo_data.py")
    if out.exists():
        print(f"demo: starting afresh, removing the previous demo run in {out}")
        shutil.rmtree(out)
    t0 = time.perf_counter()

    print("== 1/4 tokenizer: byte-level BPE on the demo corpus")
    save_tokenizer(train_tokenizer(iter_corpus([CORPUS]), 4096), out / "tokenizer")

    print("== 2/4 prepare: token shards, split by document")
    meta = prepare([str(CORPUS)], out / "tokenizer", out / "data")
    print(f"   train {meta['train']['tokens']:,} tokens, val {meta['val']['tokens']:,} tokens; "
          f"unigram baseline {meta['val_unigram_bpb']:.3f} bits/byte")

    print("== 3/4 pretrain")
    cfg = load_config(config or REPO / "configs" / "demo.toml", [f"data.dir={out / 'data'}", *(overrides or [])])
    t = time.perf_counter()
    result = run_pretrain(cfg, out / "pretrain")
    pretrain_s = time.perf_counter() - t
    print(f"   held-out: val loss {result['val_loss']:.3f} nats/token, {result['val_bpb']:.3f} bits/byte "
          f"(unigram baseline {result['val_unigram_bpb']:.3f}) in {pretrain_s:.0f}s")

    print("== 4/4 generate (temperature 0.8, top-p 0.95)")
    model, tok = load_run_model(out / "pretrain"), load_tokenizer(out / "pretrain")
    for i, prompt in enumerate(PROMPTS):
        text = "".join(stream_text(model, tok, prompt, Sampling(max_new_tokens=60, top_p=0.95, seed=i)))
        print(f"--- {prompt!r}\n{prompt}{text}")
    total = time.perf_counter() - t0
    print(f"== demo done in {total:.0f}s: held-out {result['val_bpb']:.3f} bits/byte vs unigram "
          f"{result['val_unigram_bpb']:.3f}; runs in {out}")
    return {**result, "pretrain_seconds": pretrain_s, "total_seconds": total}
