"""Token shards on disk: `chatforge prepare` writes them, a window sampler reads them through np.memmap.

A prepared data folder holds `train.bin` and `val.bin` (token ids, uint16 when the vocabulary fits
in 65,536 ids, else uint32; documents joined by <|endoftext|>), `meta.json` and the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from chatforge.data.readers import iter_corpus
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import EOT, load_tokenizer
from chatforge.train.distributed import rank_slice


def is_val_document(text: str, val_fraction: float) -> bool:
    """Deterministic split by document: a hash of the text, so order and machine do not matter."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats/token of the token frequencies: the loss of the best model that ignores context."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def prepare(paths: list[str], tokenizer_dir: str | Path, out: str | Path, val_fraction: float = 0.05,
            batch_docs: int = 512) -> dict:
    """Tokenize a corpus into train/val shards; written to a temp folder, renamed when complete."""
    if not 0 < val_fraction < 1:
        raise ChatforgeError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    tok = load_tokenizer(tokenizer_dir)
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    eot = tok.token_to_id(EOT)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats = {split: {"documents": 0, "tokens": 0, "bytes": 0} for split in ("train", "val")}
    counts = np.zeros(vocab, dtype=np.int64)
    files = {split: (tmp / f"{split}.bin").open("wb") for split in stats}
    batches: dict[str, list[str]] = {"train": [], "val": []}

    def flush(split: str) -> None:
        docs = batches[split]
        if not docs:
            return
        encoded = tok.encode_batch(docs, add_special_tokens=False)
        ids = np.concatenate([np.array(e.ids + [eot], dtype=dtype) for e in encoded])
        ids.tofile(files[split])
        stats[split]["documents"] += len(docs)
        stats[split]["tokens"] += int(ids.size)
        stats[split]["bytes"] += sum(len(d.encode("utf-8")) + 1 for d in docs)  # +1: the separator
        if split == "val":
            counts[:] += np.bincount(ids, minlength=vocab)
        docs.clear()

    with tqdm(desc="prepare", unit=" docs", mininterval=0.5 if sys.stderr.isatty() else 15) as bar:
        for doc in iter_corpus(paths):
            split = "val" if is_val_document(doc, val_fraction) else "train"
            batches[split].append(doc)
            if len(batches[split]) >= batch_docs:
                flush(split)
            bar.update(1)
        for split in stats:
            flush(split)
    for f in files.values():
        f.close()
    for split, s in stats.items():
        if s["documents"] == 0:
            shutil.rmtree(tmp)
            raise ChatforgeError(f"{', '.join(map(str, paths))}: the {split} split has no documents; "
                                 "give more documents or change --val-fraction")
    h = unigram_entropy(counts)
    meta = {
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab,
        "val_fraction": val_fraction,
        "sources": [str(p) for p in paths],
        **stats,
        "val_unigram_entropy": h,  # nats/token
        "val_unigram_bpb": h / math.log(2) * stats["val"]["tokens"] / stats["val"]["bytes"],
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.copy(Path(tokenizer_dir) / "tokenizer.json", tmp / "tokenizer.json")
    cfg = Path(tokenizer_dir) / "tokenizer_config.json"
    if cfg.is_file():
        shutil.copy(cfg, tmp / "tokenizer_config.json")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return meta


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise ChatforgeError(f"{path}: no prepared data here; run `chatforge prepare --out {data_dir}` first")
    return json.loads(path.read_text())


def open_tokens(data_dir: str | Path, split: str) -> np.memmap:
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    expected = meta[split]["tokens"] * np.dtype(meta["dtype"]).itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise ChatforgeError(f"{path}: missing or truncated ({expected} bytes expected); run `chatforge prepare` again")
    return np.memmap(path, dtype=meta["dtype"], mode="r")


class WindowSampler:
    """Random fixed-length windows of a token file. Batch i is drawn from an RNG seeded by (seed, i),
    so the sampler's whole state is one integer, `position`, and restoring it restores the stream."""

    def __init__(self, tokens: np.ndarray, context: int, batch_size: int, seed: int):
        if len(tokens) < context + 2:
            raise ChatforgeError(f"the data has {len(tokens)} tokens, fewer than the context ({context}) + 2")
        self.tokens, self.context, self.batch_size, self.seed = tokens, context, batch_size, seed
        self.position = 0

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        # every rank draws the same global batch and keeps its own stride (train/distributed.rank_slice)
        starts = rank_slice(rng.integers(0, len(self.tokens) - self.context - 1, size=self.batch_size))
        windows = np.stack([self.tokens[s : s + self.context + 1] for s in starts]).astype(np.int64)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.seed = int(state["position"]), int(state["seed"])


def eval_windows(tokens: np.ndarray, context: int, n_windows: int) -> np.ndarray:
    """Non-overlapping windows spread evenly over the split: the same ones at every evaluation."""
    total = (len(tokens) - 1) // context
    picks = np.linspace(0, total - 1, num=min(n_windows, total)).astype(np.int64)
    return np.stack([tokens[i * context : i * context + context + 1] for i in picks]).astype(np.int64)
