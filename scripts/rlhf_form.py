"""The demo's alignment part (chatforge.demo_form) on its own, for one seed: from the demo's SFT model,
a few demonstrations of "verse in a form", comparisons of the model's own samples labelled by the gold
judge, a reward model, PPO against it in two iterations (the judge's comparisons of iteration 1's samples
refresh the reward model), GRPO against the judge and DPO on the comparisons. Run it over seeds to see
whether a margin is robust (issue 21 asks for 3):

    .venv/bin/python scripts/rlhf_form.py --init runs/demo/sft --out runs/form_s1 --seed 1

Each step writes its own folder under --out and is skipped when complete; --out/eval.json has the numbers
and --out/overoptimisation.png the proxy and gold scores against √KL. `--ppo` overrides
configs/form-ppo.toml (both iterations).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from chatforge.demo_form import METHODS, RM_PROMPTS, run_form

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", type=Path, default=REPO / "runs" / "demo" / "sft", help="the demo's SFT run")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "form")
    p.add_argument("--seed", type=int, default=1337, help="train.seed of every step, and the sampling seed")
    p.add_argument("--methods", default=",".join(METHODS), help="which of ppo, grpo, dpo to run")
    p.add_argument("--rm-prompts", type=int, default=RM_PROMPTS, help="RL prompts whose samples are compared")
    p.add_argument("--ppo", nargs="*", default=None, help="PPO overrides on configs/form-ppo.toml")
    args = p.parse_args()
    replay = args.init.parent / "tasks" / "sft_replay.jsonl"
    r = run_form(args.init, replay, args.out, tuple(m for m in args.methods.split(",") if m), args.seed, args.ppo,
                 args.rm_prompts)
    for m in (r.get(name) for name in ("ppo_iter1", *METHODS)):
        if m:
            m.pop("rounds", None)
            m.pop("samples", None)
    r["sft"].pop("samples", None)
    print(json.dumps(r, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
