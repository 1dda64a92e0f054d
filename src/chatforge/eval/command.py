"""`chatforge eval`: its flags and what it prints; the measuring is in eval/suite.py and the modules it calls."""

from __future__ import annotations

import argparse

from chatforge.errors import ChatforgeError
from chatforge.layout import TASK_PROMPTS


def cmd_eval(args: argparse.Namespace) -> None:
    from chatforge.eval import suite

    if args.lm_eval:
        from chatforge.eval.lm_eval_adapter import run_lm_eval

        suite.require_policy(args.run)
        results = run_lm_eval(args.run, args.lm_eval.split(","), args.lm_eval_include, args.limit, args.batch_size)
        for task, numbers in results.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in numbers.items() if isinstance(v, float))
            print(f"eval: lm-eval {task}: {shown}")
        return
    if suite.run_kind(args.run) == "runs":
        report = suite.evaluate_runs(args.run)
        for name, numbers in report["models"].items():
            print(f"eval: {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in numbers.items() if isinstance(v, float)))
        print(f"eval: -> {args.run}/eval.json")
        return
    from chatforge.eval.task import load_task
    from chatforge.stages.reward import load_reward_model

    suite.require_policy(args.run)
    task = load_task(args.task, args.group)  # a wrong name fails here, before any model is loaded
    against, choices, harm_prompts = None, None, None
    if args.choices:
        from chatforge.eval.choice import load_choices

        choices = load_choices(args.choices)
    if args.harms:
        from chatforge.eval.harms import load_harm_prompts

        harm_prompts = load_harm_prompts(args.harm_prompts)
    rm = load_reward_model(args.reward) if args.reward else None
    prompts = suite.heldout_sample(args.prompts, args.n_prompts) if args.prompts else None
    if args.against:
        if not (rm is not None and prompts):
            raise ChatforgeError("--against needs --reward (a reward-model run) and --prompts (held-out prompts)")
        suite.require_policy(args.against, "--against")
        against = suite.evaluate_policy(args.against, prompts=prompts, reward_model=rm,
                                        task=task)["scores"]
    numbers = suite.evaluate_policy(args.run, args.data, args.text, prompts, choices, harm_prompts, rm, against,
                                    task)
    numbers.pop("scores", None)
    for reply in numbers.pop("samples", [])[:3]:
        print(f"   reply: {reply!r}")
    if not numbers:
        raise ChatforgeError("nothing to measure: give --data, --text, --prompts, --choices, --harms or --lm-eval")
    for key, value in numbers.items():
        print(f"eval: {key} {value:.4f}" if isinstance(value, float) else f"eval: {key} {value}")


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out numbers of a run, or of every model in a demo folder",
                       description="With --run runs/demo (a folder of runs): every model on the folder's held-out "
                       "splits, into runs/demo/eval.json. With one run: the measurements asked for.")
    p.add_argument("--run", required=True, help="a policy run folder, or a folder of runs such as runs/demo")
    p.add_argument("--data", help="prepared shards (chatforge prepare): bits per byte on their val split")
    p.add_argument("--text", nargs="+", help="held-out text files (.txt, .jsonl, .parquet): bits per byte")
    p.add_argument("--prompts", help="held-out task prompts .jsonl: the task's success and the end-token rate")
    p.add_argument("--task", default="chatforge.tasks.verse:TASK",
                   help="what judges the replies to --prompts: module:NAME of a Task or of a function(row, reply) -> "
                   "bool (default chatforge.tasks.verse:TASK, the demo's; chatforge.tasks.form:TASK, the alignment "
                   "part's)")
    p.add_argument("--group", metavar="FIELD", help="with a function as --task: also report success by the value "
                   "of this field of the prompt rows (success_VALUE)")
    p.add_argument("--n-prompts", type=int, default=TASK_PROMPTS,
                   help=f"at most this many of --prompts, a seeded sample (default {TASK_PROMPTS}: all of the demo's)")
    p.add_argument("--choices", help="multiple choice .jsonl {question, choices, answer}: accuracy by "
                   "log-likelihood (e.g. data/bench/wordnet_gloss.jsonl)")
    p.add_argument("--harms", action="store_true", help="the harms probe: toxicity and refusal rate")
    p.add_argument("--harm-prompts", help="prompts for the harms probe (default data/harms/prompts.jsonl)")
    p.add_argument("--reward", help="a reward-model run: its mean score of the replies to --prompts")
    p.add_argument("--against", help="a second policy run: --reward's win-rate of --run's replies over its replies")
    p.add_argument("--lm-eval", metavar="TASKS", help="run EleutherAI lm-evaluation-harness tasks (comma-separated; "
                   "needs pip install -e '.[eval]')")
    p.add_argument("--lm-eval-include", metavar="DIR", help="folder of extra lm-eval task YAML files")
    p.add_argument("--limit", type=int, help="lm-eval: at most this many documents per task")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval: sequences per forward pass (default 16)")
    p.set_defaults(func=cmd_eval)
