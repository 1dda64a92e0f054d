"""Bits per byte on held-out text: how many bits the model needs per byte of UTF-8 text,

    bpb = (Σ_t -ln p(x_t | x_<t)) / ln 2 / (number of bytes)

It compares models with different tokenizers fairly (a token may hold 1 byte or 6), and raw bytes with
no model cost 8 bits. The text is cut into windows of the model's context that do not overlap, so every
token after the first of a window is predicted once, from up to `context` tokens before it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from chatforge.data.readers import expand_paths, read_documents
from chatforge.data.shards import load_meta, open_tokens
from chatforge.errors import ChatforgeError
from chatforge.model.transformer import Transformer
from chatforge.tokenizer import encode


@torch.no_grad()
def token_nll(model: Transformer, tokens: np.ndarray, batch_size: int = 16) -> tuple[float, int]:
    """(sum of -ln p over predicted tokens, how many were predicted), windows of context + 1 tokens
    that share one token at each edge, so each token is a target once."""
    model.eval()
    ctx = model.cfg.context
    starts = range(0, max(1, len(tokens) - 1), ctx)
    windows = [torch.from_numpy(tokens[s : s + ctx + 1].astype(np.int64)) for s in starts]
    windows = [w for w in windows if len(w) > 1]
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        width = max(len(w) for w in chunk)
        x = torch.zeros(len(chunk), width - 1, dtype=torch.long)
        y = torch.full((len(chunk), width - 1), -100, dtype=torch.long)  # -100: padding, not a target
        for row, w in enumerate(chunk):
            x[row, : len(w) - 1], y[row, : len(w) - 1] = w[:-1], w[1:]
        n = int((y != -100).sum())
        total += model(x, targets=y).item() * n  # the model returns the mean over real targets
        count += n
    return total, count


def bpb_on_shards(model: Transformer, data_dir: str | Path, max_tokens: int | None = 32768) -> dict:
    """Bits per byte on the val split of `chatforge prepare`'s shards (the first `max_tokens` tokens;
    None: all of it). Bytes per token is the split's own ratio, as in pre-training's evaluation."""
    meta = load_meta(data_dir)
    if meta["vocab_size"] != model.cfg.vocab_size:
        raise ChatforgeError(f"{data_dir}/meta.json: its tokens come from a {meta['vocab_size']}-token vocabulary, "
                             f"the model has {model.cfg.vocab_size}; prepare the text with this model's tokenizer")
    tokens = np.asarray(open_tokens(data_dir, "val")[:max_tokens])
    nll, count = token_nll(model, tokens)
    bytes_per_token = meta["val"]["bytes"] / meta["val"]["tokens"]
    return {"bpb": nll / count / math.log(2) / bytes_per_token, "tokens": count}


def bpb_on_text(model: Transformer, tok: Tokenizer, paths: list[str | Path]) -> dict:
    """Bits per byte of text files (.txt, .jsonl {"text"}, .parquet), each document followed by
    <|endoftext|>; the bytes are the documents' UTF-8 bytes."""
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    n_bytes = 0
    for path in expand_paths(paths):
        for doc in read_documents(path):
            ids += [*encode(tok, doc), eot]
            n_bytes += len(doc.encode("utf-8"))
    if n_bytes == 0:
        raise ChatforgeError(f"{', '.join(map(str, paths))}: no text to measure")
    nll, count = token_nll(model, np.asarray(ids, dtype=np.int64))
    # every token but the very first is a target; the first one's bytes are counted anyway (a small bias)
    return {"bpb": nll / math.log(2) / n_bytes, "tokens": count}
