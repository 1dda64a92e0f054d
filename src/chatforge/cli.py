"""`chatforge <stage>`: one command per arrow of the pipeline. Run `chatforge <stage> --help` for details."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from chatforge.data.command import add_data_parsers
from chatforge.errors import ChatforgeError
from chatforge.eval.command import add_eval_parser
from chatforge.report.command import add_report_parser
from chatforge.serve.command import add_serve_parser


def resume_point(args: argparse.Namespace) -> str | None:
    return args.resume_from or ("latest" if args.resume else None)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from chatforge.config import load_config
    from chatforge.stages.pretrain import run_pretrain

    cfg = load_config(args.config, args.overrides)
    t = time.perf_counter()
    result = run_pretrain(cfg, args.out, resume_point(args))
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
    from chatforge.model.quantize import for_inference
    from chatforge.tokenizer import load_tokenizer

    model, tok = for_inference(load_run_model(args.run), args.dtype), load_tokenizer(args.run)
    sys.stdout.write(args.prompt)
    for piece in stream_text(model, tok, args.prompt, sampling_from(args), compile=args.compile):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args: argparse.Namespace) -> None:
    from chatforge.chat import chat_loop
    from chatforge.model.io import load_run_model
    from chatforge.model.quantize import for_inference
    from chatforge.tokenizer import load_tokenizer

    chat_loop(for_inference(load_run_model(args.run), args.dtype), load_tokenizer(args.run), sampling_from(args),
              system=args.system, compile=args.compile)


def cmd_sft(args: argparse.Namespace) -> None:
    from chatforge.config import load_config
    from chatforge.stages.sft import run_sft

    cfg = load_config(args.config, args.overrides)
    t = time.perf_counter()
    result = run_sft(cfg, args.init, args.data, args.out, args.val, resume_point(args))
    print(f"sft: {result.get('val_loss', float('nan')):.3f} val loss on assistant tokens, "
          f"{result['trainable_params']:,} trainable params, {time.perf_counter() - t:.0f}s -> {args.out}")


def cmd_classify(args: argparse.Namespace) -> None:
    from chatforge.stages.classify import predict, run_classify

    if args.predict:
        if not args.run:
            raise ChatforgeError("--predict needs --run, the folder of a trained classifier")
        for text, (label, p) in zip(args.predict, predict(args.run, args.predict), strict=True):
            print(f"{label}\t{p:.3f}\t{text}")
        return
    if not (args.init and args.data and args.val):
        raise ChatforgeError("training a classifier needs --init RUN, --data FILE.jsonl and --val FILE.jsonl")
    from chatforge.config import load_config

    result = run_classify(load_config(args.config, args.overrides), args.init, args.data, args.val, args.out,
                          resume_point(args))
    print(f"classify: held-out accuracy {result['val_accuracy']:.1%} (majority class "
          f"{result['majority_baseline']:.1%}) -> {args.out}")
    labels = result["labels"]
    print("confusion (rows: truth, columns: predicted)\n" + "\t".join(["", *labels]))
    for label, row in zip(labels, result["confusion"], strict=True):
        print("\t".join([label, *map(str, row)]))


def cmd_rm(args: argparse.Namespace) -> None:
    if args.score:
        from chatforge.stages.reward import score_responses

        if not args.run:
            raise ChatforgeError("--score needs --run, the folder of a trained reward model")
        for reward, response in score_responses(args.run, args.score):
            print(f"{reward:.4f}\t{response}")
        return
    if not (args.init and args.data and args.val):
        raise ChatforgeError("training a reward model needs --init RUN, --data prefs.jsonl and --val prefs.jsonl")
    from chatforge.config import load_config
    from chatforge.stages.reward import run_reward

    result = run_reward(load_config(args.config, args.overrides), args.init, args.data, args.val, args.out,
                        resume_point(args))
    print(f"rm: held-out pairwise accuracy {result['val_accuracy']:.1%} on {result['val_pairs']} pairs -> {args.out}")


def cmd_dpo(args: argparse.Namespace) -> None:
    from chatforge.config import load_config
    from chatforge.stages.dpo import run_dpo

    cfg = load_config(args.config, args.overrides)
    result = run_dpo(cfg, args.init, args.data, args.val, args.out, resume_point(args))
    print(f"dpo: held-out implicit-reward accuracy {result['val_reward_accuracy']:.1%}, "
          f"margin {result['val_reward_margin']:.3f} -> {args.out}")


def cmd_pairs(args: argparse.Namespace) -> None:
    from chatforge.stages.pairs import run_pairs

    result = run_pairs(args.init, args.prompts, args.reward, args.out, args.group, args.temperature,
                       args.max_new_tokens, args.limit, args.seed, args.per_group)
    print(f"pairs: {result['pairs']:,} pairs from {result['prompts']:,} prompts -> {args.out}")


def cmd_rl(args: argparse.Namespace) -> None:
    """ppo and grpo: --reward is a reward-model run folder or a module:function."""
    from chatforge.config import load_config

    cfg = load_config(args.config, args.overrides)
    reward_run = None
    if args.reward and Path(args.reward).is_dir():
        reward_run = args.reward
    elif args.reward:
        if ":" not in args.reward:
            raise ChatforgeError(f"--reward {args.reward}: neither a reward-model run folder nor a module:function")
        cfg.rl.reward = args.reward
    t = time.perf_counter()
    if args.command == "ppo":
        from chatforge.stages.ppo import run_ppo

        result = run_ppo(cfg, args.init, args.prompts, args.out, reward_run, args.val, resume_point(args),
                         args.reference)
    else:
        from chatforge.stages.grpo import run_grpo

        result = run_grpo(cfg, args.init, args.prompts, args.out, reward_run, args.val, resume_point(args))
    numbers = ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k.startswith("val_") and isinstance(v, float))
    print(f"{args.command}: {numbers or 'done'}, {time.perf_counter() - t:.0f}s -> {args.out}")


def cmd_tasks(args: argparse.Namespace) -> None:
    from chatforge.tasks.verse import build_source_labels, build_tasks

    counts = {**build_tasks(args.corpus, args.out), **build_source_labels(args.corpus, args.out)}
    print("tasks: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f" -> {args.out}")


def cmd_export(args: argparse.Namespace) -> None:

    from chatforge.model.io import load_run_model, save_model_files
    from chatforge.model.lora import merge_lora
    from chatforge.tokenizer import copy_tokenizer

    if args.to:
        from chatforge.interop.hf import export_hf

        config = export_hf(args.run, args.to)
        print(f"export: {config['architectures'][0]} for transformers -> {args.to} "
              "(AutoModelForCausalLM / AutoTokenizer.from_pretrained)")
        return
    if not args.merge or not args.out:
        raise ChatforgeError("export needs --to DIR (a transformers folder) or --merge --out DIR (fold LoRA adapters)")
    if not (Path(args.run) / "adapter.json").is_file():
        raise ChatforgeError(f"{args.run}: no adapter.json here, so nothing to merge; it is already a full model")
    model = merge_lora(load_run_model(args.run))
    save_model_files(model, args.out, {"stage": "merged", "from": str(args.run)})
    copy_tokenizer(Path(args.run), args.out)
    print(f"export: merged LoRA adapters of {args.run} into {args.out}/model.safetensors")


def cmd_import(args: argparse.Namespace) -> None:
    from chatforge.interop.hf import import_hf

    cfg = import_hf(args.source, args.out)
    print(f"import: {cfg.style} style, {cfg.n_layer} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size} "
          f"-> {args.out}")


def cmd_consolidate(args: argparse.Namespace) -> None:
    from chatforge.train.checkpoint import consolidate

    src = Path(args.checkpoint)
    out = consolidate(src, args.out or src.with_name(src.name + "-full"))
    print(f"consolidate: {src} (sharded) -> {out}: one process resumes it with --resume-from {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from chatforge.demo import run_demo

    align = ("ppo", "dpo", "grpo") if args.align == "all" else tuple(a for a in args.align.split(",") if a)
    run_demo(args.out, args.config, args.overrides, align, args.fresh)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off, default 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--stop", action="append", help="stop string (repeatable), not printed")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable output")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decode step (torch.compile over a preallocated KV cache): "
                   "seconds to start, then faster per token")
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="fp32 (default, exact), bf16, or int8 weights with bf16 activations (fastest decode)")


def add_run_flags(p: argparse.ArgumentParser, example_config: str, default_out: str) -> None:
    """The flags every training stage shares: config, run folder, resume, dotted overrides."""
    p.add_argument("--config", help=f"TOML config (e.g. {example_config})")
    p.add_argument("--out", default=default_out, help=f"run folder (default {default_out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--resume-from", metavar="STEP|DIR", help="continue from a given step number or checkpoint folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 train.lr=1e-3 lora.r=8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    add_data_parsers(sub)

    p = sub.add_parser("pretrain", help="pre-train a model on prepared shards",
                       description="Pre-train. Overrides look like train.lr=1e-3 model.n_layer=4; a mixture "
                                   "of experts: model.moe.n_experts=4 model.moe.top_k=2 (docs/moe.md).")
    add_run_flags(p, "configs/demo.toml", "runs/default/pretrain")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="supervised fine-tuning on chat data (loss on assistant tokens only)",
                       description="SFT. Rows: {\"messages\": [...]} or {\"prompt\", \"completion\"}. "
                       "LoRA with lora.r=8 lora.targets=q,k,v,o.")
    p.add_argument("--init", required=True, help="run folder of the model to start from (e.g. runs/demo/pretrain)")
    p.add_argument("--data", required=True, help="training conversations, .jsonl")
    p.add_argument("--val", help="held-out conversations, .jsonl (val loss on assistant tokens)")
    add_run_flags(p, "configs/demo-sft.toml", "runs/default/sft")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("classify", help="train a classification head (or --predict with a trained one)",
                       description="Rows {\"text\", \"label\"}; classify.freeze=head|last_n|none.")
    p.add_argument("--init", help="run folder of the model to start from")
    p.add_argument("--data", help="training rows, .jsonl")
    p.add_argument("--val", help="held-out rows, .jsonl (accuracy and confusion matrix)")
    p.add_argument("--run", help="with --predict: the trained classifier's run folder")
    p.add_argument("--predict", nargs="+", metavar="TEXT", help="classify these texts with --run")
    add_run_flags(p, "configs/demo-classify.toml", "runs/default/classify")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("rm", help="train a reward model on preference pairs (or --score responses)",
                       description="Rows {\"prompt\", \"chosen\", \"rejected\"}: strings or message lists. "
                       "Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - reward.margin).")
    p.add_argument("--init", help="run folder to start from (the SFT model, as in InstructGPT), or a reward-model "
                                  "run to train further on new comparisons (iterated RLHF)")
    p.add_argument("--data", help="training preference pairs, .jsonl")
    p.add_argument("--val", help="held-out preference pairs, .jsonl (pairwise accuracy)")
    p.add_argument("--run", help="with --score: the reward model's run folder")
    p.add_argument("--score", metavar="FILE", help="score {\"prompt\", \"response\"} rows with --run")
    add_run_flags(p, "configs/demo-rm.toml", "runs/default/rm")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("dpo", help="direct preference optimisation against the frozen starting model",
                       description="Rows {\"prompt\", \"chosen\", \"rejected\"}. dpo.beta=0.1, "
                       "dpo.loss=sigmoid|ipo|cdpo, dpo.label_smoothing (cdpo), dpo.nll_coef (RPO: NLL on chosen).")
    p.add_argument("--init", required=True, help="run folder of the policy to start from (the SFT model)")
    p.add_argument("--data", required=True, help="training preference pairs, .jsonl")
    p.add_argument("--val", required=True, help="held-out preference pairs, .jsonl")
    add_run_flags(p, "configs/demo-dpo.toml", "runs/default/dpo")
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("pairs", help="preference pairs from a policy's own samples, for DPO or a reward model",
                       description="Sample --group replies to each prompt, score them with --reward, and write the "
                       "best and the worst as {\"prompt\", \"chosen\", \"rejected\"} when they differ (or up to "
                       "--per-group pairs of a better and a worse reply).")
    p.add_argument("--init", "--policy", dest="init", required=True,
                   help="run folder of the policy to sample (the SFT model); --policy is the old name")
    p.add_argument("--prompts", required=True, help="prompt rows {\"prompt\", ...}, .jsonl")
    p.add_argument("--reward", required=True, help="a module:function (the labeller) or a reward-model run folder")
    p.add_argument("--out", required=True, help="the pairs file to write, .jsonl")
    p.add_argument("--group", type=int, default=4, help="replies sampled per prompt (default 4)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="longest reply, in tokens (default 40)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--per-group", type=int, default=1,
                   help="pairs per prompt: 1 = best against worst (default); more = a sample of all the "
                        "(better, worse) pairs, as InstructGPT uses every comparison of a ranking")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_pairs)

    rl_help = ("rl.prompts_per_rollout, rl.group_size, rl.epochs (minibatch: train.batch_size replies), "
               "rl.kl_coef, rl.kl_target (adaptive), rl.no_end_penalty, rl.max_new_tokens, rl.temperature")
    for name, what in (("ppo", "PPO with a KL penalty to the starting model (InstructGPT)"),
                       ("grpo", "GRPO: G replies per prompt, advantages within the group")):
        p = sub.add_parser(name, help=what, description=f"{what}. Prompt rows {{\"prompt\", ...}}; the other "
                           f"fields go to a reward function. Settings: {rl_help}; ppo also rl.gamma, rl.lam, "
                           "rl.value_coef, rl.ptx_coef.")
        p.add_argument("--init", *(["--policy"] if name == "ppo" else []), dest="init", required=True,
                       help="run folder of the policy to start from (the SFT model); also the frozen reference"
                       + (" unless --reference (--policy is the old name of --init)" if name == "ppo" else ""))
        p.add_argument("--reward", required=name == "ppo",
                       help="a reward-model run folder (chatforge rm), or module:function(prompt, response, **row)"
                       " -> float, e.g. chatforge.tasks.verse:reward")
        p.add_argument("--prompts", required=True, help="training prompts, .jsonl")
        if name == "ppo":
            p.add_argument("--reference", help="the frozen reference of the KL penalty, if not --init: the SFT "
                                               "model, when --init is an earlier PPO run (iterated RLHF)")
        p.add_argument("--val", help="held-out prompts, .jsonl: mean reward and KL to the reference while training")
        add_run_flags(p, f"configs/demo-{name}.toml", f"runs/default/{name}")
        p.set_defaults(func=cmd_rl)

    p = sub.add_parser("tasks", help="build the demo task data (instructions, held-out prompts, labels)")
    p.add_argument("--corpus", default="data/demo/corpus.jsonl.gz")
    p.add_argument("--out", default="runs/demo/tasks")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("export", help="a run as a transformers folder (--to), or a LoRA run merged (--merge)")
    p.add_argument("--run", required=True, help="run folder (a LoRA run is merged first)")
    p.add_argument("--to", help="folder for config.json, model.safetensors, tokenizer: loads in transformers")
    p.add_argument("--merge", action="store_true", help="fold the adapters into the base weights: W + (alpha/r) B A")
    p.add_argument("--out", help="with --merge: folder for the merged model.safetensors + model.json")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="a transformers folder (GPT-2, Llama, Mistral, Qwen2) as a chatforge run")
    p.add_argument("--from", dest="source", required=True, help="config.json + safetensors + tokenizer.json folder")
    p.add_argument("--out", required=True, help="run folder to write")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal with a chat model")
    p.add_argument("--run", required=True, help="run folder of a chat model (e.g. runs/demo/sft)")
    p.add_argument("--system", help="system message")
    add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    add_serve_parser(sub)

    p = sub.add_parser("generate", help="generate text from a trained model, streamed")
    p.add_argument("--run", required=True, help="run folder with model.safetensors and tokenizer.json")
    p.add_argument("--prompt", required=True)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    add_eval_parser(sub)

    add_report_parser(sub)

    p = sub.add_parser("consolidate", help="a sharded (FSDP) checkpoint as one single-process checkpoint")
    p.add_argument("--checkpoint", required=True, help="a sharded checkpoint folder, e.g. runs/x/checkpoints/step_200")
    p.add_argument("--out", help="where to write it (default: beside it, STEP-full)")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("demo", help="the whole pipeline on the bundled demo data")
    p.add_argument("--out", default="runs/demo", help="folder for every stage's run (default runs/demo)")
    p.add_argument("--config", default=None, help="pre-training config (default configs/demo.toml)")
    p.add_argument("--fresh", action="store_true", help="delete the previous demo run first (by default a complete "
                   "stage is skipped and an interrupted one resumes)")
    p.add_argument("--align", default="ppo", help="alignment after the reward model: ppo (default), dpo, grpo, "
                   "a comma-separated list, all, or '' for none")
    p.add_argument("overrides", nargs="*", help="dotted overrides for pre-training, e.g. train.steps=100")
    p.set_defaults(func=cmd_demo)
    return parser


# Commands that train or build something into --out: their wall time, power and CO2 go to OUT/energy.json.
MEASURED = {"tokenizer", "prepare", "pretrain", "sft", "classify", "rm", "dpo", "ppo", "grpo"}


def energy_meter(args: argparse.Namespace):
    """eval/energy.measure around a stage that trains into --out (not --predict or --score); a resumed
    stage adds to the energy it already spent."""
    import contextlib

    if args.command not in MEASURED or not getattr(args, "out", None):
        return contextlib.nullcontext()
    if getattr(args, "predict", None) or getattr(args, "score", None):
        return contextlib.nullcontext()
    from chatforge.eval.energy import measure

    return measure(args.command, args.out, accumulate=bool(getattr(args, "resume", False)
                                                           or getattr(args, "resume_from", None)))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import os

    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 prints; errors still go to stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    try:
        with energy_meter(args):
            args.func(args)
        from chatforge.train.distributed import teardown

        teardown()
    except ChatforgeError as e:
        print(f"chatforge {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"chatforge {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)



if __name__ == "__main__":
    main()
