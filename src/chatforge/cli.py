"""`chatforge <stage>`: one command per arrow of the pipeline. Run `chatforge <stage> --help` for details."""

from __future__ import annotations

import argparse
import sys
import time

from chatforge.errors import ChatforgeError


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from chatforge.data.readers import iter_corpus
    from chatforge.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(iter_corpus(args.data), args.vocab_size)
    save_tokenizer(tok, args.out)
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {args.out}/tokenizer.json")


def cmd_prepare(args: argparse.Namespace) -> None:
    from chatforge.data.shards import prepare

    meta = prepare(args.data, args.tokenizer, args.out, args.val_fraction)
    print(f"prepare: train {meta['train']['tokens']:,} tokens ({meta['train']['documents']:,} docs), "
          f"val {meta['val']['tokens']:,} tokens ({meta['val']['documents']:,} docs), "
          f"{meta['train']['bytes'] / meta['train']['tokens']:.2f} bytes/token; "
          f"unigram baseline {meta['val_unigram_bpb']:.3f} bits/byte -> {args.out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from chatforge.config import load_config
    from chatforge.stages.pretrain import run_pretrain

    cfg = load_config(args.config, args.overrides)
    t = time.perf_counter()
    result = run_pretrain(cfg, args.out, args.resume_from or ("latest" if args.resume else None))
    print(f"pretrain: val loss {result['val_loss']:.3f}, val bits/byte {result['val_bpb']:.3f} "
          f"(unigram baseline {result['val_unigram_bpb']:.3f}), {result['params']:,} params, "
          f"{time.perf_counter() - t:.0f}s -> {args.out}")


def sampling_from(args: argparse.Namespace):
    from chatforge.model.generate import Sampling

    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, stop=args.stop or [], seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> None:
    from chatforge.model.generate import stream_text
    from chatforge.model.io import load_run_model
    from chatforge.tokenizer import load_tokenizer

    model, tok = load_run_model(args.run), load_tokenizer(args.run)
    sys.stdout.write(args.prompt)
    for piece in stream_text(model, tok, args.prompt, sampling_from(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_demo(args: argparse.Namespace) -> None:
    from chatforge.demo import run_demo

    run_demo(args.out, args.config, args.overrides)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off, default 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--stop", action="append", help="stop string (repeatable), not printed")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus")
    p.add_argument("--data", nargs="+", required=True, help=".txt/.txt.gz/.jsonl{text}/.parquet files or folders")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size incl. 256 bytes + 4 specials")
    p.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards")
    p.add_argument("--data", nargs="+", required=True, help="corpus files or folders")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    p.add_argument("--out", required=True, help="folder for train.bin, val.bin, meta.json")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="pre-train a model on prepared shards",
                       description="Pre-train. Overrides look like train.lr=1e-3 model.n_layer=4.")
    p.add_argument("--config", help="TOML config (see configs/)")
    p.add_argument("--out", default="runs/default/pretrain", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--resume-from", metavar="STEP|DIR", help="continue from a given step number or checkpoint folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("generate", help="generate text from a trained model, streamed")
    p.add_argument("--run", required=True, help="run folder with model.safetensors and tokenizer.json")
    p.add_argument("--prompt", required=True)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the whole pipeline on the bundled demo data")
    p.add_argument("--out", default="runs/demo", help="folder for every stage's run (default runs/demo)")
    p.add_argument("--config", default=None, help="pre-training config (default configs/demo.toml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for pre-training, e.g. train.steps=100")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ChatforgeError as e:
        print(f"chatforge {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"chatforge {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)



if __name__ == "__main__":
    main()
