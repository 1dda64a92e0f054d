"""The demo's alignment part: InstructGPT's three steps on a task with headroom, "verse in a form"
(tasks/form.py), from the demo's SFT model, with a program as the labeller (Gao et al., 2022's gold).

  1. SFT on a few demonstrations of the form (and replayed rows of the demo's SFT data, so it keeps them)
  2. comparisons of that model's own samples, labelled by the gold judge; a reward model fitted to them
  3. PPO against the reward model (never the judge), in two iterations of iterated RLHF (Bai et al., 2022,
     §4.5): after iteration 1 the judge compares its policy's own samples and the reward model trains on them too,
     so it learns to see where the policy has gone (iteration 1 alone can climb a blind spot); iteration 2
     goes on from iteration 1's policy, its KL penalty still to the SFT model. GRPO against the judge and DPO on the
     comparisons, for reference, on the same prompts

and what the RLHF papers measure, on held-out keywords: the SFT model's headroom (pass@8 at T = 1 minus
greedy success), the reward model's AUC on the SFT model's own samples, each method's greedy gold success
and KL to SFT, best-of-n against the reward model, and the proxy and gold scores of PPO's rounds against
√KL (form/overoptimisation.png). Every folder is under OUT/form; a complete one is skipped.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from chatforge.config import load_config
from chatforge.eval.task import best_of_n, evaluate_task, pass_at_k
from chatforge.model.io import load_run_model
from chatforge.tasks.form import TASK, build_form_tasks
from chatforge.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "demo" / "corpus.jsonl.gz"
GOLD = "chatforge.tasks.form:reward"
DEMOS, HELD_OUT, RM_PROMPTS = 300, 300, 500  # form demonstrations in SFT, held-out prompts scored, RM prompts
SAMPLES = 4  # samples at T = 1 per held-out prompt of each aligned model, for its sampled gold success
REFRESH_PROMPTS = 250  # prompts whose replies from PPO's iteration 1 the judge compares for the refreshed reward model
METHODS = ("ppo", "grpo", "dpo")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def make_form_data(replay: Path, tasks: Path, demos: int = DEMOS, held_out: int = HELD_OUT,
                   rm_prompts: int = RM_PROMPTS) -> None:
    """The SFT mix (a few form demonstrations and three times as many rows of the demo's own SFT data,
    `replay`, so it keeps what it had), a seeded sample of held-out prompts, and the RL prompts split
    between the reward model's comparisons (of the SFT model's replies, and of PPO iteration 1's) and the RL
    methods, so PPO never trains on a prompt the reward model was fitted to."""
    build_form_tasks(CORPUS, tasks)
    rng = random.Random(0)
    form = rng.sample(read_jsonl(tasks / "form_sft.jsonl"), demos)
    mix = form + rng.sample(read_jsonl(replay), 3 * len(form))
    rng.shuffle(mix)
    write_jsonl(tasks / "mix.jsonl", mix)
    held = rng.sample(read_jsonl(tasks / "form_heldout.jsonl"), held_out)
    write_jsonl(tasks / "held.jsonl", held)
    write_jsonl(tasks / "rm_val_prompts.jsonl", held[: held_out // 2])  # the RM's held-out pairs
    rl = read_jsonl(tasks / "form_rl.jsonl")
    write_jsonl(tasks / "rm_prompts.jsonl", rl[:rm_prompts])
    write_jsonl(tasks / "refresh_prompts.jsonl", rl[rm_prompts : rm_prompts + REFRESH_PROMPTS])
    write_jsonl(tasks / "rl_prompts.jsonl", rl[rm_prompts + REFRESH_PROMPTS :])


def measure(run: Path, rows: list[dict], reward_model=None, seed: int = 0, k: int = 0,
            more_reward_models: dict | None = None) -> dict:
    """Greedy gold success (all, English, Chinese); with k > 0 also k samples at T = 1 of each prompt: the
    share of good samples (`sample_success`: the mean gold reward of the policy's samples, what Gao et al.
    plot and what PPO optimises), pass@8 when k ≥ 8, and with a reward model its AUC on them and their
    scores and verdicts (for best-of-n); `more_reward_models` rank the same samples ("{name}_auc")."""
    model, tok = load_run_model(run), load_tokenizer(run)
    greedy = evaluate_task(model, tok, rows, TASK, max_new_tokens=40)
    out = {"greedy": greedy["success"], "greedy_en": greedy["success_en"], "greedy_zh": greedy["success_zh"],
           "samples": greedy["samples"]}
    if k:
        sampled = pass_at_k(model, tok, rows, TASK, k=k, max_new_tokens=40, reward_model=reward_model, seed=seed,
                            more_reward_models=more_reward_models)
        if k >= 8:
            verdicts = sampled["verdicts"]
            sampled["pass_at_8"] = sum(any(verdicts[i : i + 8]) for i in range(0, len(rows) * k, k)) / len(rows)
        out.update(sampled)
    return out


def rl_rounds(run: Path) -> list[dict]:
    """The numbers of each round of rollouts an RL run logged: KL, reward, gold score, distinct-2."""
    log = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    keys = ("step", "kl", "reward", "gold", "distinct_2")
    return [{k: row[k] for k in keys if k in row} for row in log if "kl" in row]


def form_eval(form: Path, methods: tuple[str, ...], seed: int) -> dict:
    """Every number of the alignment part, written to form/eval.json, and the over-optimisation plot."""
    from chatforge.report.plots import plot_overoptimisation
    from chatforge.stages.reward import load_reward_model

    rows, rm = read_jsonl(form / "tasks" / "held.jsonl"), load_reward_model(form / "rm").eval()
    # the refreshed reward model, which PPO's iteration 2 climbs, judged on the same samples of the SFT model
    refreshed = {"rm_iter2": load_reward_model(form / "rm_iter2").eval()} if "ppo" in methods else None
    sft = measure(form / "sft", rows, rm, seed, k=16, more_reward_models=refreshed)
    bon = [{"n": n, "kl": math.log(n) - (n - 1) / n} for n in (1, 2, 4, 8, 16)]
    for b in bon:
        b["gold"], b["proxy"] = best_of_n(sft["scores"], sft["verdicts"], 16, b["n"])
    del sft["scores"], sft["verdicts"]
    r = {"seed": seed, "held_out_prompts": len(rows), "sft": sft, "best_of_n": bon,
         "headroom": sft["pass_at_8"] - sft["greedy"], "rm_auc": sft["rm_auc"],
         "rm_accuracy": json.loads((form / "rm" / "eval.json").read_text())["val_accuracy"]}
    if "ppo" in methods:
        r["rm_iter2_accuracy"] = json.loads((form / "rm_iter2" / "eval.json").read_text())["val_accuracy"]
        r["rm_iter2_auc"] = sft.pop("rm_iter2_auc")
    for name in (["ppo_iter1"] if "ppo" in methods else []) + list(methods):
        m = measure(form / name, rows, seed=seed, k=SAMPLES)
        m = {k: v for k, v in m.items() if k not in ("verdicts", f"pass_at_{SAMPLES}")}
        m["gain"] = m["greedy"] - sft["greedy"]
        m["sample_gain"] = m["sample_success"] - sft["sample_success"]
        result = json.loads((form / name / "eval.json").read_text())
        if "val_kl" in result:
            m["kl"] = result["val_kl"]
            m["rounds"] = rl_rounds(form / name)
        r[name] = m
    if "ppo" in methods:  # PPO's rounds of samples over both iterations, each against its own reward model
        first = r["ppo_iter1"]["rounds"]
        r["ppo"]["rounds"] = first + [row | {"step": row["step"] + first[-1]["step"], "iteration": 2}
                                      for row in r["ppo"]["rounds"]]
        del r["ppo_iter1"]["rounds"], r["ppo_iter1"]["samples"]
    plot_overoptimisation(r, form)
    (form / "eval.json").write_text(json.dumps(r, indent=2, ensure_ascii=False) + "\n")
    return r


def form_results(form: dict, folder: str | Path) -> dict:
    """The numbers of form/eval.json for results.json, flat (`form_*`), and the seconds of each step; the
    RL part (comparisons, reward models, both iterations of PPO, the other RL methods; not the held-out pairs)
    is `align_seconds`."""
    from chatforge.eval.energy import load_energy
    from chatforge.layout import FORM_STEPS

    r = {f"form_{k}": form[k] for k in ("headroom", "rm_auc", "rm_accuracy")}
    r |= {f"form_sft_{k}": form["sft"][k] for k in ("greedy", "greedy_en", "greedy_zh", "pass_at_8", "sample_success")}
    r["form_best_of_16"] = form["best_of_n"][-1]["gold"]
    for key in ("rm_iter2_accuracy", "rm_iter2_auc"):
        if key in form:
            r[f"form_{key}"] = form[key]
    for name in (m for m in ("ppo_iter1", *METHODS) if m in form):
        r |= {f"form_{name}_{k}": form[name][k] for k in ("greedy", "greedy_en", "greedy_zh", "gain", "kl",
                                                            "sample_success", "sample_gain") if k in form[name]}
    folder = Path(folder)
    rl_steps = ("pairs", "rm", "ppo_iter1", "pairs_iter2", "rm_iter2", *METHODS)
    for step in FORM_STEPS:
        energy = load_energy(folder / step)
        if energy:
            r[f"form_{step}_seconds"] = round(energy["seconds"], 1)
    r["align_seconds"] = round(sum(r.get(f"form_{s}_seconds", 0) for s in rl_steps), 1)
    return r


def run_form(init: str | Path, replay: str | Path, form: str | Path, methods: tuple[str, ...] = METHODS,
             seed: int = 1337, ppo: list[str] | None = None, rm_prompts: int = RM_PROMPTS) -> dict:
    """The alignment part from `init` (the demo's SFT model; `replay` its SFT rows) into `form`; returns
    form/eval.json."""
    from chatforge.demo import run_stage
    from chatforge.stages.dpo import run_dpo
    from chatforge.stages.grpo import run_grpo
    from chatforge.stages.pairs import run_pairs
    from chatforge.stages.ppo import run_ppo
    from chatforge.stages.reward import run_reward
    from chatforge.stages.sft import run_sft

    init, form, configs = Path(init), Path(form), REPO / "configs"
    tasks = form / "tasks"

    def cfg(name: str, overrides: list[str] | None = None, seed: int = seed):
        return load_config(configs / name, [*(overrides or []), f"train.seed={seed}"])

    print("   -- tasks: verse in a form, held-out keywords")
    run_stage("form-tasks", tasks, ["held.jsonl", "rl_prompts.jsonl"],
              lambda _: make_form_data(Path(replay), tasks, rm_prompts=rm_prompts))
    print(f"   -- step 1, sft: {DEMOS} demonstrations of the form, from {init}")
    run_stage("form-sft", form / "sft", ["model.safetensors", "eval.json"],
              lambda resume: run_sft(cfg("form-sft.toml"),
                                     init, tasks / "mix.jsonl", form / "sft", resume=resume))
    print("   -- comparisons: the judge ranks 8 of the SFT model's samples per prompt; 4 pairs each")

    def compare(prompts: str, folder: str, pair_seed: int) -> None:
        run_stage(f"form-{folder}", form / folder, ["pairs.jsonl"], lambda _: run_pairs(
            form / "sft", tasks / prompts, GOLD, form / folder / "pairs.jsonl", group_size=8, per_group=4,
            seed=pair_seed))

    compare("rm_prompts.jsonl", "pairs", seed)
    # the same on half the held-out prompts: the reward model's (and DPO's) held-out pairs, for evaluation
    compare("rm_val_prompts.jsonl", "heldout_pairs", seed + 1)
    print("   -- step 2, rm: a reward model on those comparisons (Bradley-Terry)")
    run_stage("form-rm", form / "rm", ["reward.safetensors", "eval.json"],
              lambda resume: run_reward(cfg("form-rm.toml"), form / "sft",
                                        form / "pairs" / "pairs.jsonl", form / "heldout_pairs" / "pairs.jsonl",
                                        form / "rm", resume=resume))
    if "ppo" in methods:
        print("   -- step 3, ppo, iteration 1: against the reward model, never the judge")
        run_stage("form-ppo-iter1", form / "ppo_iter1", ["model.safetensors", "eval.json"],
                  lambda resume: run_ppo(cfg("form-ppo.toml", ppo), form / "sft", tasks / "rl_prompts.jsonl",
                                         form / "ppo_iter1", form / "rm", tasks / "held.jsonl", resume))
        print("   -- refresh: the judge compares iteration 1's own samples; the reward model trains on them too")
        run_stage("form-pairs-iter2", form / "pairs_iter2", ["pairs.jsonl"], lambda _: run_pairs(
            form / "ppo_iter1", tasks / "refresh_prompts.jsonl", GOLD, form / "pairs_iter2" / "pairs.jsonl",
            group_size=8, per_group=4, seed=seed + 2))

        def refresh_reward_model(resume: str | None) -> None:
            both = form / "pairs_iter2" / "both_iterations.jsonl"  # the first comparisons and the new ones
            both.write_text((form / "pairs" / "pairs.jsonl").read_text(encoding="utf-8")
                            + (form / "pairs_iter2" / "pairs.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
            run_reward(cfg("form-rm-iter2.toml"), form / "rm", both, form / "heldout_pairs" / "pairs.jsonl",
                       form / "rm_iter2", resume=resume)

        run_stage("form-rm-iter2", form / "rm_iter2", ["reward.safetensors", "eval.json"], refresh_reward_model)
    runners = {  # PPO's iteration 2 goes on from iteration 1's policy (new prompts: another seed), KL still to SFT
        "ppo": lambda resume: run_ppo(cfg("form-ppo-iter2.toml", ppo, seed + 1), form / "ppo_iter1",
                                      tasks / "rl_prompts.jsonl", form / "ppo", form / "rm_iter2",
                                      tasks / "held.jsonl", resume, reference_run=form / "sft"),
        "grpo": lambda resume: run_grpo(cfg("form-grpo.toml"),
                                        form / "sft", tasks / "rl_prompts.jsonl", form / "grpo", None,
                                        tasks / "held.jsonl", resume),
        "dpo": lambda resume: run_dpo(cfg("form-dpo.toml"), form / "sft",
                                      form / "pairs" / "pairs.jsonl", form / "heldout_pairs" / "pairs.jsonl",
                                      form / "dpo", resume),
    }
    for name in (m for m in METHODS if m in methods):
        print(f"   -- step 3, {name}" + {"ppo": ", iteration 2: against the refreshed reward model",
                                         "grpo": " against the judge itself (for reference)",
                                         "dpo": " on the comparisons"}[name])
        run_stage(f"form-{name}", form / name, ["model.safetensors", "eval.json"], runners[name])
    print("   -- eval: held-out keywords, greedy gold success, pass@8, the reward model's AUC, best-of-n")
    def evaluate(_resume: str | None) -> None:
        (form / "eval").mkdir(parents=True, exist_ok=True)
        form_eval(form, methods, seed)
        (form / "eval" / "done").write_text("")

    run_stage("form-eval", form / "eval", ["done"], evaluate)
    return json.loads((form / "eval.json").read_text())
