"""The results-table rows of the demo's alignment part (demo_form.py): verse in a form, judged by a program."""

from __future__ import annotations

from chatforge.report.summary import num, pct, seconds

SPLIT = "held-out keywords of verse in a form (form/tasks/held.jsonl)"
WHAT = {
    "en": {"sft": "verse in a form, {n} held-out prompts: SFT on {d} demonstrations, greedy gold success / "
                  "pass@8 at T = 1 (headroom for RL)",
           "rm": "reward model fitted to the judge's comparisons of the SFT model's own samples (time: the "
                 "comparisons and the fit): AUC on its "
                 "samples to held-out prompts (good vs bad); pairwise accuracy on held-out comparisons; "
                 "after PPO's refresh, the refreshed reward model's AUC on the same samples",
           "ppo": "PPO against the reward model (never the judge), two iterations, the reward model refreshed "
                  "on the judge's comparisons of iteration 1's samples (time: both iterations and the refresh): "
                  "gold success, greedy (English / Chinese); sampled at T = 1; KL to SFT",
           "ppo_iter1": "PPO, iteration 1 alone (against the first reward model): gold success, greedy "
                        "(English / Chinese); sampled at T = 1; KL to SFT",
           "grpo": "GRPO against the judge itself: gold success, greedy (English / Chinese); sampled at T = 1; "
                    "KL to SFT",
           "dpo": "DPO on the comparisons: gold success, greedy (English / Chinese); sampled at T = 1",
           "bon": "best-of-16 samples of the SFT model, picked by the reward model: gold success; KL"},
    "zh": {"sft": "按格式写诗句,{n} 条留出提示:用 {d} 条示范做 SFT,贪心解码的金标准成功率 / T = 1 的 pass@8"
                  "(留给 RL 的空间)",
           "rm": "在评判程序对 SFT 模型自身采样的比较上训练的奖励模型(时间含采样比较与训练):"
                 "对留出提示采样回复的 AUC(好 vs 坏);"
                 "留出比较对的成对准确率;PPO 更新后的奖励模型对同样采样的 AUC",
           "ppo": "PPO 对奖励模型优化(从不看评判程序),两轮迭代:第二轮前用评判程序对第一轮策略采样的比较"
                  "更新奖励模型(时间含两轮与更新):金标准成功率,贪心(英文 / 中文);T = 1 采样;对 SFT 的 KL",
           "ppo_iter1": "只看 PPO 第一轮(对最初的奖励模型):金标准成功率,贪心(英文 / 中文);T = 1 采样;对 SFT 的 KL",
           "grpo": "GRPO 直接对评判程序优化:金标准成功率,贪心(英文 / 中文);T = 1 采样;对 SFT 的 KL",
           "dpo": "在这些比较对上做 DPO:金标准成功率,贪心(英文 / 中文);T = 1 采样",
           "bon": "SFT 模型的 16 个采样中由奖励模型选最好的:金标准成功率;KL"},
}


def _row(stage: str, what: str, result: str, baseline: str = "", time: str = "") -> dict:
    return {"stage": stage, "what": what, "result": result, "baseline": baseline, "time": time, "split": SPLIT}


def form_rows(info: dict, z: bool) -> list[dict]:
    """Rows for the SFT headroom, the reward model's sight, PPO (the point), GRPO, DPO and best-of-16."""
    form, res = info.get("form") or {}, info["results"]
    if not form.get("sft"):
        return []
    lang, sft = "zh" if z else "en", form["sft"]
    w, sep = WHAT[lang], ";" if z else "; "

    def t(*steps: str) -> str:
        values = [res.get(f"form_{step}_seconds") for step in steps]
        ok = all(isinstance(v, int | float) for v in values)
        return seconds(sum(values), lang) if ok else ""

    def gold(m: dict) -> str:
        gain = f" ({100 * m['gain']:+.1f})" if "gain" in m else ""
        sampled = ""
        if isinstance(m.get("sample_success"), int | float):  # the mean gold reward of its samples at T = 1
            sampled = f"{sep}{'采样' if z else 'sampled'} **{pct(m['sample_success'])}**"
            sampled += f" ({100 * m['sample_gain']:+.1f})" if "sample_gain" in m else ""
        return f"**{pct(m['greedy'])}**{gain} ({pct(m['greedy_en'])} / {pct(m['greedy_zh'])}){sampled}"

    base = f"SFT {pct(sft['greedy'])} ({pct(sft['greedy_en'])} / {pct(sft['greedy_zh'])})"
    if isinstance(sft.get("sample_success"), int | float):
        base += f"{sep}{'采样' if z else 'sampled'} {pct(sft['sample_success'])}"
    rm = f"**{pct(form['rm_auc'])}**{sep}{pct(form['rm_accuracy'])}"
    if isinstance(form.get("rm_iter2_auc"), int | float):
        rm += f"{sep}{'更新后' if z else 'refreshed'} **{pct(form['rm_iter2_auc'])}**"
    rows = [_row("sft", w["sft"].format(n=form["held_out_prompts"], d=form.get("demos", 300)),
                 f"{pct(sft['greedy'])} / **{pct(sft['pass_at_8'])}** ({100 * form['headroom']:+.1f})",
                 "目标:空间 ≥ 15 个百分点" if z else "aim: headroom ≥ 15 points", t("sft")),
            _row("rm", w["rm"], rm,
                 "随机 50%" if z else "chance 50%", t("pairs", "rm"))]
    steps = {"ppo": ("ppo_iter1", "pairs_iter2", "rm_iter2", "ppo"), "ppo_iter1": ("ppo_iter1",)}
    for name in ("ppo_iter1", "ppo", "grpo", "dpo"):
        m = form.get(name)
        if isinstance(m, dict):
            kl = f"{sep}KL {num(m['kl'], 2)}" if isinstance(m.get("kl"), int | float) else ""
            rows.append(_row(name.split("_")[0], w[name], gold(m) + kl, base, t(*steps.get(name, (name,)))))
    best = form["best_of_n"][-1]
    rows.append(_row("ppo", w["bon"], f"{pct(best['gold'])}{sep}KL {num(best['kl'], 2)}", base))
    return rows
