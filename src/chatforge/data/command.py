"""`chatforge tokenizer` and `chatforge prepare`: their flags and what they print; the work is in
tokenizer.py and data/shards.py."""

from __future__ import annotations

import argparse


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from chatforge.data.readers import iter_corpus
    from chatforge.tokenizer import cjk_coverage, save_tokenizer, train_tokenizer

    tok = train_tokenizer(lambda: iter_corpus(args.data), args.vocab_size, args.cjk_share)
    save_tokenizer(tok, args.out)
    whole, seen = cjk_coverage(tok, lambda: iter_corpus(args.data))
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {args.out}/tokenizer.json"
          + (f"; {whole:,} of the corpus's {seen:,} distinct CJK characters are one token" if seen else ""))


def cmd_prepare(args: argparse.Namespace) -> None:
    from chatforge.data.shards import prepare

    meta = prepare(args.data, args.tokenizer, args.out, args.val_fraction)
    print(f"prepare: train {meta['train']['tokens']:,} tokens ({meta['train']['documents']:,} docs), "
          f"val {meta['val']['tokens']:,} tokens ({meta['val']['documents']:,} docs), "
          f"{meta['train']['bytes'] / meta['train']['tokens']:.2f} bytes/token; "
          f"unigram baseline {meta['val_unigram_bpb']:.3f} bits/byte -> {args.out}")


def add_data_parsers(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus")
    p.add_argument("--data", nargs="+", required=True, help=".txt/.txt.gz/.jsonl{text}/.parquet files or folders")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size incl. 256 bytes + 4 specials")
    p.add_argument("--cjk-share", type=float, default=0.25,
                   help="repeat texts with Chinese/Japanese characters while learning merges until they are at least "
                        "this share of the characters, so a mostly English corpus still gets whole-character "
                        "tokens (default 0.25; 0 = plain byte-level BPE)")
    p.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards")
    p.add_argument("--data", nargs="+", required=True, help="corpus files or folders")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    p.add_argument("--out", required=True, help="folder for train.bin, val.bin, meta.json")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    p.set_defaults(func=cmd_prepare)
