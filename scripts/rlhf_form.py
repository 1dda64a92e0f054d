"""InstructGPT's steps 2 and 3 on a task with headroom, "verse in a form" (tasks/form.py), from the demo's
SFT model: a few demonstrations, comparisons of the model's own samples labelled by the gold judge, a reward
model, and PPO against it (never the judge). Issue 21's three numbers, on held-out keywords:

  headroom   pass@8 at T = 1 minus greedy success of the SFT model
  judge      the reward model's AUC on the SFT model's own sampled replies (gold-preferred vs not)
  PPO        greedy gold success of PPO minus SFT's, with the KL to SFT

    .venv/bin/python scripts/rlhf_form.py --init runs/demo/sft --out runs/form [--seed 1337]

Each stage writes its own folder under --out and is skipped when complete; results.json has the numbers,
and overoptimisation.png the proxy (reward-model) and gold scores against √KL for PPO's rounds and for
best-of-n sampling against the reward model (Gao et al., 2022, Fig. 1).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from chatforge.config import load_config
from chatforge.eval.task import best_of_n, evaluate_task, pass_at_k
from chatforge.model.io import load_run_model
from chatforge.stages.pairs import run_pairs
from chatforge.stages.ppo import run_ppo
from chatforge.stages.reward import load_reward_model, run_reward
from chatforge.stages.sft import run_sft
from chatforge.tasks.form import build_form_tasks, check
from chatforge.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
GOLD = "chatforge.tasks.form:reward"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def make_data(init: Path, tasks: Path, demos: int, held_out: int, rm_prompts: int) -> None:
    """The SFT mix (a few form demonstrations and three times as many rows of the demo's own SFT data, so it
    keeps what it had), a seeded sample of held-out prompts, and the RL prompts split between the reward
    model's comparisons and PPO, so PPO never trains on a prompt the reward model was fitted to."""
    build_form_tasks(REPO / "data" / "demo" / "corpus.jsonl.gz", tasks)
    rng = random.Random(0)
    form = rng.sample(read_jsonl(tasks / "form_sft.jsonl"), demos)
    replay = read_jsonl(init.parent / "tasks" / "sft_replay.jsonl")
    mix = form + rng.sample(replay, 3 * len(form))
    rng.shuffle(mix)
    write_jsonl(tasks / "mix.jsonl", mix)
    write_jsonl(tasks / "held.jsonl", rng.sample(read_jsonl(tasks / "form_heldout.jsonl"), held_out))
    rl = read_jsonl(tasks / "form_rl.jsonl")
    write_jsonl(tasks / "rm_prompts.jsonl", rl[:rm_prompts])
    write_jsonl(tasks / "ppo_prompts.jsonl", rl[rm_prompts:])


def measure(run: Path, rows: list[dict], reward_model, seed: int, k: int = 8) -> dict:
    """Greedy gold success (all, English, Chinese), and from k samples at T = 1 of each prompt: pass@8, the
    share of good samples, the reward model's AUC on them, and their scores and verdicts (for best-of-n)."""
    model, tok = load_run_model(run), load_tokenizer(run)
    by_lang = {lang: [r for r in rows if r["kind"] == f"form_{lang}"] for lang in ("en", "zh")}
    greedy = {lang: evaluate_task(model, tok, part, max_new_tokens=40, checker=check)["success"]
              for lang, part in by_lang.items()}
    sampled = pass_at_k(model, tok, rows, k=k, max_new_tokens=40, checker=check, reward_model=reward_model,
                        seed=seed)
    sampled["pass_at_8"] = sum(any(sampled["verdicts"][i : i + 8]) for i in range(0, len(rows) * k, k)) / len(rows)
    mean = sum(greedy[lang] * len(part) for lang, part in by_lang.items()) / len(rows)
    return {"greedy": mean, "greedy_en": greedy["en"], "greedy_zh": greedy["zh"], **sampled}


def plot_overoptimisation(ppo_log: list[dict], bon: list[dict], path: Path) -> None:
    """Gold and proxy against √KL: PPO's rounds (samples of each round) and best-of-n of the SFT model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in ppo_log if "gold" in r]
    fig, gold_ax = plt.subplots(figsize=(6.4, 4.2))
    proxy_ax = gold_ax.twinx()
    x = [math.sqrt(max(r["kl"], 0)) for r in rounds]
    gold_ax.plot(x, [r["gold"] for r in rounds], "o-", color="tab:green", ms=3, label="PPO: gold (judge)")
    proxy_ax.plot(x, [r["reward"] for r in rounds], "o--", color="tab:blue", ms=3, label="PPO: proxy (reward model)")
    xb = [math.sqrt(b["kl"]) for b in bon]
    gold_ax.plot(xb, [b["gold"] for b in bon], "s-", color="tab:olive", ms=3, label="best-of-n: gold")
    proxy_ax.plot(xb, [b["proxy"] for b in bon], "s--", color="tab:cyan", ms=3, label="best-of-n: proxy")
    gold_ax.set_xlabel("√KL to the SFT model (nats^½)")
    gold_ax.set_ylabel("gold success of the samples")
    proxy_ax.set_ylabel("reward-model score")
    fig.legend(loc="upper left", bbox_to_anchor=(0.1, 0.95), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", type=Path, default=REPO / "runs" / "demo" / "sft", help="the demo's SFT run")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "form")
    p.add_argument("--seed", type=int, default=1337, help="train.seed of every stage, and the sampling seed")
    p.add_argument("--demos", type=int, default=300, help="form demonstrations in SFT (few: that is the point)")
    p.add_argument("--held-out", type=int, default=300, help="held-out prompts scored (a seeded sample)")
    p.add_argument("--rm-prompts", type=int, default=1500, help="RL prompts whose samples are compared")
    p.add_argument("--ppo", nargs="*", default=["train.steps=60"], help="PPO overrides on configs/demo-ppo.toml")
    args = p.parse_args()
    out, tasks, seed = args.out, args.out / "tasks", args.seed
    quiet = ["train.eval_every=100000", "train.checkpoint_every=100000", f"train.seed={seed}"]
    if not (tasks / "held.jsonl").is_file():
        make_data(args.init, tasks, args.demos, args.held_out, args.rm_prompts)
    if not (out / "sft" / "model.safetensors").is_file():  # step 1: a few demonstrations
        cfg = load_config(REPO / "configs" / "demo-sft.toml", ["train.steps=300", "train.lr=1e-3",
                                                               "train.warmup_steps=10", *quiet])
        run_sft(cfg, args.init, tasks / "mix.jsonl", out / "sft")
    if not (tasks / "pairs_val.jsonl").is_file():  # the labeller compares the SFT model's own samples
        print(run_pairs(out / "sft", tasks / "rm_prompts.jsonl", GOLD, tasks / "pairs.jsonl", group_size=8,
                        per_group=4, seed=seed))
        print(run_pairs(out / "sft", tasks / "held.jsonl", GOLD, tasks / "pairs_val.jsonl", group_size=8,
                        per_group=4, seed=seed + 1))
    if not (out / "rm" / "reward.safetensors").is_file():  # step 2: the reward model
        cfg = load_config(REPO / "configs" / "demo-rm.toml", ["train.steps=300", *quiet])
        run_reward(cfg, out / "sft", tasks / "pairs.jsonl", tasks / "pairs_val.jsonl", out / "rm")
    if not (out / "ppo" / "model.safetensors").is_file():  # step 3: PPO against it, never the judge
        cfg = load_config(REPO / "configs" / "demo-ppo.toml", [*args.ppo, f"rl.gold={GOLD}", *quiet])
        run_ppo(cfg, out / "sft", tasks / "ppo_prompts.jsonl", out / "ppo", out / "rm", tasks / "held.jsonl")
    rows, rm = read_jsonl(tasks / "held.jsonl"), load_reward_model(out / "rm").eval()
    sft, ppo = measure(out / "sft", rows, rm, seed, k=16), measure(out / "ppo", rows, rm, seed)
    bon = [{"n": n, "kl": math.log(n) - (n - 1) / n} for n in (1, 2, 4, 8, 16)]
    for b in bon:
        b["gold"], b["proxy"] = best_of_n(sft["scores"], sft["verdicts"], 16, b["n"])
    log = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").open()]
    plot_overoptimisation(log, bon, out / "overoptimisation.png")
    for m in (sft, ppo):
        del m["scores"], m["verdicts"]
    r = {"seed": seed, "held_out_prompts": len(rows), "sft": sft, "ppo": ppo, "best_of_n": bon,
         "ppo_rounds": [{k: row[k] for k in ("step", "kl", "reward", "gold", "distinct_2") if k in row}
                        for row in log if "kl" in row],
         "rm_accuracy": json.loads((out / "rm" / "eval.json").read_text())["val_accuracy"],
         "ppo_kl": json.loads((out / "ppo" / "eval.json").read_text())["val_kl"],
         "headroom": sft["pass_at_8"] - sft["greedy"], "ppo_gain": ppo["greedy"] - sft["greedy"]}
    (out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
