"""The results-table rows of the demo's alignment part (demo_form.py): verse in a form, judged by a program."""

from __future__ import annotations

from chatforge.report.summary import num, pct, seconds

SPLIT = "held-out keywords of verse in a form (form/tasks/held.jsonl)"
def _row(stage: str, what: str, result: str, baseline: str = "", time: str = "") -> dict:
    return {"stage": stage, "what": what, "result": result, "baseline": baseline, "time": time, "split": SPLIT}


def form_rows(info: dict, t: dict) -> list[dict]:
    """Rows for the SFT headroom, the reward model's sight, PPO (the point), GRPO, DPO and best-of-16; `t` is
    the language's table of words (report/strings.py)."""
    form, res = info.get("form") or {}, info["results"]
    if not form.get("sft"):
        return []
    sft, sep = form["sft"], t["sep"]

    def time(*steps: str) -> str:
        values = [res.get(f"form_{step}_seconds") for step in steps]
        ok = all(isinstance(v, int | float) for v in values)
        return seconds(sum(values), t["lang"]) if ok else ""

    def gold(m: dict) -> str:
        gain = f" ({100 * m['gain']:+.1f})" if "gain" in m else ""
        sampled = ""
        if isinstance(m.get("sample_success"), int | float):  # the mean gold reward of its samples at T = 1
            sampled = f"{sep}{t['sampled']} **{pct(m['sample_success'])}**"
            sampled += f" ({100 * m['sample_gain']:+.1f})" if "sample_gain" in m else ""
        return f"**{pct(m['greedy'])}**{gain} ({pct(m['greedy_en'])} / {pct(m['greedy_zh'])}){sampled}"

    base = f"SFT {pct(sft['greedy'])} ({pct(sft['greedy_en'])} / {pct(sft['greedy_zh'])})"
    if isinstance(sft.get("sample_success"), int | float):
        base += f"{sep}{t['sampled']} {pct(sft['sample_success'])}"
    rm = f"**{pct(form['rm_auc'])}**{sep}{pct(form['rm_accuracy'])}"
    if isinstance(form.get("rm_iter2_auc"), int | float):
        rm += f"{sep}{t['refreshed']} **{pct(form['rm_iter2_auc'])}**"
    rows = [_row("sft", t["form_sft"].format(n=form["held_out_prompts"], d=form.get("demos", 300)),
                 f"{pct(sft['greedy'])} / **{pct(sft['pass_at_8'])}** ({100 * form['headroom']:+.1f})",
                 t["headroom_aim"], time("sft")),
            _row("rm", t["form_rm"], rm, t["chance_50"], time("pairs", "rm"))]
    steps = {"ppo": ("ppo_iter1", "pairs_iter2", "rm_iter2", "ppo"), "ppo_iter1": ("ppo_iter1",)}
    for name in ("ppo_iter1", "ppo", "grpo", "dpo"):
        m = form.get(name)
        if isinstance(m, dict):
            kl = f"{sep}KL {num(m['kl'], 2)}" if isinstance(m.get("kl"), int | float) else ""
            rows.append(_row(name.split("_")[0], t[f"form_{name}"], gold(m) + kl, base,
                             time(*steps.get(name, (name,)))))
    best = form["best_of_n"][-1]
    rows.append(_row("ppo", t["form_bon"], f"{pct(best['gold'])}{sep}KL {num(best['kl'], 2)}", base))
    return rows
