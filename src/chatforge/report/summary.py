"""The per-stage summary rows: the README's "Results" table, rebuilt from what a run folder holds.

One function per stage turns the run's files into rows of (what is measured, result, baseline, time), in
English or Chinese, worded like README.md and README.zh-CN.md so `chatforge report --readme` can keep the
README's table in step with the latest run instead of someone copying numbers by hand.
"""

from __future__ import annotations

import re

from chatforge.report.load import model_metrics, series, stage_seconds, task_prompt_count

LABELS = {"en": {"tokenizer": "tokenizer", "prepare": "prepare", "pretrain": "pretrain", "copy": "copy", "sft": "SFT",
                 "rm": "reward model", "ppo": "PPO", "grpo": "GRPO", "dpo": "DPO", "classify": "classify",
                 "eval": "eval", "energy": "energy"},
          "zh": {"tokenizer": "分词器", "prepare": "数据准备", "pretrain": "预训练", "copy": "复制", "sft": "SFT",
                 "rm": "奖励模型", "ppo": "PPO", "grpo": "GRPO", "dpo": "DPO", "classify": "分类", "eval": "评测",
                 "energy": "能耗"}}
# What to run for a stage that is missing (shown in the HTML/Markdown report, not in the README table).
COMMANDS = {"tokenizer": "chatforge tokenizer --data CORPUS --out RUN/tokenizer",
            "prepare": "chatforge prepare --data CORPUS --tokenizer RUN/tokenizer --out RUN/data",
            "pretrain": "chatforge pretrain --config configs/demo.toml --out RUN/pretrain",
            "copy": "chatforge sft --init RUN/pretrain --data RUN/tasks/copy_train.jsonl --out RUN/copy",
            "sft": "chatforge sft --init RUN/copy --data RUN/tasks/sft_replay.jsonl --out RUN/sft",
            "rm": "chatforge rm --init RUN/sft --data ... --val ... --out RUN/rm",
            "ppo": "chatforge ppo --init RUN/sft --reward RUN/rm --prompts ... --out RUN/ppo",
            "grpo": "chatforge grpo --init RUN/sft --reward ... --prompts ... --out RUN/grpo",
            "dpo": "chatforge dpo --init RUN/sft --data ... --val ... --out RUN/dpo",
            "classify": "chatforge classify --init RUN/pretrain --data ... --val ... --out RUN/classify",
            "eval": "chatforge eval --run RUN",
            "energy": "chatforge demo --out RUN"}
# Where each stage's number comes from (the report's "held-out split" column).
SPLITS = {"tokenizer": "the val documents' tokens (data/val.bin)",
          "prepare": "every document goes to train or val by a hash of its text",
          "pretrain": "val documents (data/val.bin), never trained on",
          "copy": "held-out lines (the copy_val file), never trained on",
          "sft": "held-out task prompts (keywords never seen in training)",
          "rm": "held-out preference pairs (the rm --val file)",
          "ppo": "held-out task prompts; reward on each round's fresh training prompts",
          "grpo": "held-out task prompts",
          "dpo": "held-out preference pairs (the dpo --val file); held-out task prompts",
          "classify": "held-out lines (the classify --val file)",
          "eval": "data/bench/wordnet_gloss.jsonl, data/harms/prompts.jsonl, held-out task prompts: none trained on",
          "energy": "wall time of every stage × estimated power (energy.json)"}
DASH = "—"


def pct(x: float | None) -> str:
    """A fraction as the README writes it: 0.1104 → 11.0%."""
    return DASH if x is None else f"{100 * x:.1f}%"


def num(x: float | None, digits: int) -> str:
    """A number with fixed decimals and a real minus sign (−1.06), as the README writes it."""
    return DASH if x is None else f"{x:.{digits}f}".replace("-", "−")


def seconds(s: float | None, lang: str = "en") -> str:
    """Wall time: one decimal under 20 s (13.5 s), whole seconds above (135 s)."""
    if s is None:
        return ""
    value = f"{s:.1f}" if s < 20 else f"{s:,.0f}"
    return f"{value} 秒" if lang == "zh" else f"{value} s"


def _si(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k" if n >= 1e3 else f"{n:.0f}"


def _num(d: dict, key: str) -> float | None:
    value = d.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _row(stage: str, what: str, result: str, baseline: str = "", time: str = "", split: str | None = None) -> dict:
    return {"stage": stage, "what": what, "result": result, "baseline": baseline, "time": time,
            "split": SPLITS.get(stage, "") if split is None else split}


def _by_lang(m: dict) -> tuple[float, float] | None:
    en, zh = _num(m, "success_en"), _num(m, "success_zh")
    return (en, zh) if en is not None and zh is not None else None


def _tokenizer(info: dict, z: bool) -> list[dict]:
    meta, t = info["data_meta"], seconds(stage_seconds(info, "tokenizer"), "zh" if z else "en")
    if not (meta or info["has_tokenizer"] or t):
        return []
    val, train = meta.get("val", {}), meta.get("train", {})
    vocab = f"{meta['vocab_size']:,}" if isinstance(meta.get("vocab_size"), int) else "?"
    size = (train.get("bytes", 0) + val.get("bytes", 0)) / 1e6
    what = (f"字节级 BPE,{vocab} 个词元,训练于 {size:.1f} MB 文本" if z
            else f"byte-level BPE, {vocab} tokens, on {size:.1f} MB")
    ratio = val["bytes"] / val["tokens"] if val.get("tokens") else None
    unit = "字节/词元" if z else "bytes/token"
    result = f"{num(ratio, 2)} {unit}" if ratio else DASH
    base = "1 字节/词元(原始字节)" if z else "1 byte/token (raw bytes)"
    return [_row("tokenizer", what, result, base, t)]


def _prepare(info: dict, z: bool) -> list[dict]:
    meta = info["data_meta"]
    if not meta:
        return []
    tr, va = meta.get("train", {}), meta.get("val", {})
    if z:
        what = f"训练 {tr.get('documents', 0):,} / 验证 {va.get('documents', 0):,} 篇文档(按文档哈希划分)"
        result = f"{_si(tr.get('tokens', 0))} / {_si(va.get('tokens', 0))} 词元"
    else:
        what = f"{tr.get('documents', 0):,} train / {va.get('documents', 0):,} val documents (split by document hash)"
        result = f"{_si(tr.get('tokens', 0))} / {_si(va.get('tokens', 0))} tokens"
    return [_row("prepare", what, result, "", seconds(stage_seconds(info, "data"), "zh" if z else "en"))]


def _paren(text: str, z: bool) -> str:
    """English " (text)", Chinese "(text)" with no space (as README.zh-CN.md writes it), "" for no text."""
    return "" if not text else f"({text})" if z else f" ({text})"


def _pretrain(info: dict, z: bool) -> list[dict]:
    ev, res, cfg = info["stage_eval"].get("pretrain", {}), info["results"], info["config"].get("pretrain", {})
    bpb = _first(_num(ev, "val_bpb"), _num(res, "val_bpb"))
    if "pretrain" not in info["stages"] and bpb is None:
        return []
    loss = _first(_num(ev, "val_loss"), _num(res, "val_loss"))
    uni = _first(_num(ev, "val_unigram_bpb"), _num(res, "unigram_bpb"), _num(info["data_meta"], "val_unigram_bpb"))
    ent = _first(_num(ev, "val_unigram_entropy"), _num(info["data_meta"], "val_unigram_entropy"))
    params = _first(_num(ev, "params"), _num(res, "params"))
    model, train = cfg.get("model", {}), cfg.get("train", {})
    style = {"llama": "Llama", "gpt2": "GPT-2"}.get(model.get("style", ""), model.get("style", ""))
    parts = [f"{params / 1e6:.1f} M {'参数' if z else 'params'}"] if params else []
    if style:
        parts.append(f"{style} 风格" if z else f"{style} style")
    if train.get("steps") and train.get("batch_size") and model.get("context"):
        per_step = train["batch_size"] * train.get("grad_accum", 1) * model["context"]
        steps = train["steps"]
        parts.append(f"{steps} 步 × {per_step:,} 词元" if z else f"{steps} steps × {per_step:,} tokens")
    what = ("验证集每字节比特数" if z else "val bits per byte") + _paren((",".join if z else ", ".join)(parts), z)
    nats = "nats/词元" if z else "nats/token"
    result = f"**{num(bpb, 3)}** bpb" + (_paren(f"{num(loss, 3)} {nats}", z) if loss is not None else "")
    base = ""
    if uni is not None:
        base = f"{'一元模型' if z else 'unigram'} {num(uni, 3)} bpb"
        base += _paren(f"{num(ent, 3)} {nats}", z) if ent is not None else ""
    return [_row("pretrain", what, result, base, seconds(stage_seconds(info, "pretrain"), "zh" if z else "en"))]


def _copy(info: dict, z: bool) -> list[dict]:
    copy_eval = info["stage_eval"].get("copy", {})
    exact = _first(_num(copy_eval, "copy_exact"), _num(info["results"], "copy_exact"))
    if exact is None:
        return []
    what = ("复制阶段:“重复这句诗”,从未训练过的留出诗句(英文、中文各半)被逐字重复的比例" if z else
            "copy phase: \"Repeat this line\", held-out lines never trained on (half English, half Chinese), "
            "repeated exactly")
    result = f"**{pct(exact)}**"
    en, zh = _num(copy_eval, "copy_exact_en"), _num(copy_eval, "copy_exact_zh")
    if en is not None and zh is not None:
        result += f" (英文 {pct(en)},中文 {pct(zh)})" if z else f" (English {pct(en)}, Chinese {pct(zh)})"
    base = ("基座模型没有归纳头(scripts/induction_probe.py)" if z else
            "the base model has no induction head (scripts/induction_probe.py)")
    return [_row("copy", what, result, base, seconds(stage_seconds(info, "copy"), "zh" if z else "en"))]


def _sft(info: dict, z: bool, n: str) -> list[dict]:
    sft, base = model_metrics(info, "sft"), model_metrics(info, "base")
    if "sft" not in info["stages"] and not sft:
        return []
    t, same = seconds(stage_seconds(info, "sft"), "zh" if z else "en"), "(同上)" if z else "(same)"
    basel = "基座模型" if z else "base model"
    if z:
        what1 = f"48 个词元内以 `<|im_end|>` 结束的回复,{n}条留出提示"
        what2 = f"约束满足率(程序判定),{n}条留出提示"
    else:
        what1 = f"replies that end with `<|im_end|>` within 48 tokens, {n}held-out prompts"
        what2 = f"constraint success (checker), {n}held-out prompts"
    result2, base2 = f"**{pct(_num(sft, 'success'))}**", f"{basel} {pct(_num(base, 'success'))}"
    if _by_lang(sft):
        what2 += ":全部 / 英文 / 中文" if z else ": all / English / Chinese"
        result2 += " / " + " / ".join(pct(x) for x in _by_lang(sft))
    return [_row("sft", what1, f"**{pct(_num(sft, 'end_rate'))}**", f"{basel} {pct(_num(base, 'end_rate'))}", t),
            _row("sft", what2, result2, base2, same)]


def _rm(info: dict, z: bool) -> list[dict]:
    ev = info["stage_eval"].get("rm", {})
    acc = _first(_num(ev, "val_accuracy"), _num(info["results"], "rm_accuracy"))
    if "rm" not in info["stages"] and acc is None:
        return []
    pairs = ev.get("val_pairs")
    if z:
        what = ("成对准确率(chosen 得分高于 rejected)" + (f",{pairs:,} 个留出偏好对" if pairs else "")
                + ",从 SFT 模型出发")
    else:
        what = ("pairwise accuracy (chosen scored above rejected)" + (f", {pairs:,} held-out pairs" if pairs else "")
                + ", from the SFT model")
    return [_row("rm", what, f"**{pct(acc)}**", "随机 50%" if z else "chance 50%",
                 seconds(stage_seconds(info, "rm"), "zh" if z else "en"))]


def _ppo(info: dict, z: bool, n: str) -> list[dict]:
    ppo, sft = model_metrics(info, "ppo"), model_metrics(info, "sft")
    if "ppo" not in info["stages"] and not ppo:
        return []
    kl = _first(_num(ppo, "kl"), _num(info["results"], "ppo_kl"), _num(info["stage_eval"].get("ppo", {}), "val_kl"))
    if z:
        what = f"约束满足率,{n}条留出提示(贪心解码);采样回复对 SFT 的 KL"
        result = pct(_num(ppo, "success")) + (f";KL {num(kl, 2)} nats/回复" if kl is not None else "")
    else:
        what = f"constraint success, {n}held-out prompts (greedy); KL to SFT of sampled replies"
        result = pct(_num(ppo, "success")) + (f"; KL {num(kl, 2)} nats/reply" if kl is not None else "")
    rows = [_row("ppo", what, result, f"SFT {pct(_num(sft, 'success'))}",
                 seconds(stage_seconds(info, "ppo"), "zh" if z else "en"))]
    _, rewards = series(info["metrics"].get("ppo", []), "reward")
    first = _first(_num(info["results"], "ppo_reward_first"), rewards[0] if rewards else None)
    last = _first(_num(info["results"], "ppo_reward_last"), sum(rewards[-5:]) / len(rewards[-5:]) if rewards else None)
    if first is not None and last is not None:
        what = ("每轮新提示上采样回复的奖励模型得分,第一轮 → 最后五个记录步" if z else
                "reward-model score of its sampled replies on each round's fresh prompts, first round → last five "
                "logged steps")
        rows.append(_row("ppo", what, f"**{num(first, 2)} → {num(last, 2)}**", "",
                         "(同上)" if z else "(same)", split="fresh training prompts of each round (not held out)"))
    if _by_lang(ppo):
        sft_lang = " / ".join(pct(x) for x in _by_lang(sft)) if _by_lang(sft) else DASH
        what = "按语言的约束满足率:英文 / 中文" if z else "constraint success by language: English / Chinese"
        rows.append(_row("ppo", what, " / ".join(pct(x) for x in _by_lang(ppo)), f"SFT {sft_lang}"))
    return rows


def _lang_note(m: dict, z: bool, named: bool) -> str:
    lang = _by_lang(m)
    if not lang:
        return ""
    if named:
        en, zh = pct(lang[0]), pct(lang[1])
        return f"(英文 {en},中文 {zh})" if z else f" (English {en}, Chinese {zh})"
    return f"({pct(lang[0])} / {pct(lang[1])})" if z else f" ({pct(lang[0])} / {pct(lang[1])})"


def _grpo(info: dict, z: bool, n: str) -> list[dict]:
    grpo, sft = model_metrics(info, "grpo"), model_metrics(info, "sft")
    if "grpo" not in info["stages"] and not grpo:
        return []
    kl = _first(_num(grpo, "kl"), _num(info["results"], "grpo_kl"), _num(info["stage_eval"].get("grpo", {}), "val_kl"))
    what = f"约束满足率,{n}条留出提示(贪心解码);对 SFT 的 KL" if z else \
        f"constraint success, {n}held-out prompts (greedy); KL to SFT"
    result = f"**{pct(_num(grpo, 'success'))}**{_lang_note(grpo, z, True)}" + \
        ((";" if z else "; ") + f"KL {num(kl, 2)}" if kl is not None else "")
    base = f"SFT {pct(_num(sft, 'success'))}{_lang_note(sft, z, False)}"
    return [_row("grpo", what, result, base, seconds(stage_seconds(info, "grpo"), "zh" if z else "en"))]


def _dpo(info: dict, z: bool) -> list[dict]:
    dpo, sft, ev = model_metrics(info, "dpo"), model_metrics(info, "sft"), info["stage_eval"].get("dpo", {})
    acc = _first(_num(ev, "val_reward_accuracy"), _num(info["results"], "dpo_preference_accuracy"))
    if "dpo" not in info["stages"] and acc is None and not dpo:
        return []
    pairs = ev.get("val_pairs") or info["counts"]["prefs_val"]
    if z:
        what = "留出集隐式奖励准确率(chosen 高于 rejected)" + (f",{pairs:,} 对" if pairs else "") + ";约束满足率"
        base = f"开始时为 0%(策略 = 参考模型);SFT {pct(_num(sft, 'success'))}"
        result = f"**{pct(acc)}**;{pct(_num(dpo, 'success'))}{_lang_note(dpo, z, False)}"
    else:
        what = ("held-out implicit-reward accuracy (chosen above rejected)" + (f", {pairs:,} pairs" if pairs else "")
                + "; constraint success")
        base = f"0% at the start (policy = reference); SFT {pct(_num(sft, 'success'))}"
        result = f"**{pct(acc)}**; {pct(_num(dpo, 'success'))}{_lang_note(dpo, z, False)}"
    return [_row("dpo", what, result, base, seconds(stage_seconds(info, "dpo"), "zh" if z else "en"))]


def _classify(info: dict, z: bool) -> list[dict]:
    ev = info["stage_eval"].get("classify", {})
    acc = _first(_num(ev, "val_accuracy"), _num(info["results"], "classify_accuracy"))
    if "classify" not in info["stages"] and acc is None:
        return []
    major = _first(_num(ev, "majority_baseline"), _num(info["results"], "classify_majority"))
    k = len(ev.get("labels", []))
    lines = sum(map(sum, ev["confusion"])) if isinstance(ev.get("confusion"), list) else None
    if z:
        what = "判断诗句出处" + (f"({k} 类)" if k else "") + (f",{lines:,} 条留出诗句" if lines else "")
    else:
        what = ("which source is a line from" + (f" ({k} classes)" if k else "")
                + (f", {lines:,} held-out lines" if lines else ""))
    return [_row("classify", what, f"**{pct(acc)}**", f"{'多数类' if z else 'majority class'} {pct(major)}",
                 seconds(stage_seconds(info, "classify"), "zh" if z else "en"))]


def _by_model(info: dict, key: str, fmt, names: tuple[str, ...]) -> str:
    """"base 25.3% / SFT 31.0% / PPO 30.3%" for the models that have `key`."""
    shown = [f"{'base' if n == 'base' else n.upper()} {fmt(model_metrics(info, n)[key])}" for n in names
             if key in model_metrics(info, n)]
    return " / ".join(shown)


def _eval(info: dict, z: bool) -> list[dict]:
    models = tuple(info["eval"].get("models", {}))
    if not models:
        return []
    rows, chance = [], _num(info["eval"].get("chance", {}), "choice")
    bpb = _by_model(info, "bpb", lambda x: num(x, 3), models)
    if bpb:
        what = ("每个模型在验证集文档上的每字节比特数(前 32,768 个词元)" if z else
                "bits per byte of every model on the val documents (first 32,768 tokens)")
        rows.append(_row("eval", what, bpb, "对齐让模型忘掉一部分语料" if z else "fine-tuning trades corpus fit "
                         "for chat: the alignment tax"))
    choice = _by_model(info, "choice_accuracy", pct, models)
    if choice:
        n = next((m["choice_questions"] for m in info["eval"].get("models", {}).values()
                  if isinstance(m, dict) and m.get("choice_questions")), None)  # absent in older eval.json
        what = ("WordNet 释义选词(4 选 1,按对数似然)" + (f",{n} 题" if n else "") if z else
                "which word has this WordNet gloss (4 choices, by log-likelihood)" + (f", {n} questions" if n else ""))
        rows.append(_row("eval", what, choice, f"{'随机' if z else 'chance'} {pct(chance)}"))
    aligned = tuple(n for n in models if n not in ("base", "sft"))
    win = _by_model(info, "rm_win_rate", pct, ("base", *aligned))
    if win:
        what = ("奖励模型判定胜过 SFT 回复的比例(同一批留出提示)" if z else
                "reward model prefers the model's reply to SFT's, same held-out prompts")
        rows.append(_row("eval", what, win, "SFT 50%(平局)" if z else "SFT itself 50% (a tie)"))
    auc = _by_model(info, "rm_auc", pct, tuple(n for n in models if n != "base"))
    if auc:
        what = ("奖励模型能否分辨该模型自己的留出回复:成功者得分高于失败者的概率(AUC)" if z else
                "reward model tells each model's own held-out replies apart: P(a success outscores a failure), AUC")
        rows.append(_row("eval", what, auc, "看不出 50%" if z else "blind 50%"))
    toxic = _by_model(info, "toxic_rate", pct, models)
    refusal = _by_model(info, "refusal_rate", pct, models)
    if toxic:
        harms = info["eval"].get("harms", {}).get("prompts")
        what = (f"有害探针,{harms} 条提示:含词表脏词的回复比例;应拒绝时的拒绝率" if z else
                f"harms probe, {harms} prompts: replies with a lexicon term (LDNOOBW); refusal rate where a refusal "
                "is due")
        rows.append(_row("eval", what, f"{toxic}; {refusal}",
                         "玩具模型没有拒绝训练数据" if z else "no refusal data in the demo: 0% is expected",
                         seconds(stage_seconds(info, "eval"), "zh" if z else "en")))
    return rows


def _energy(info: dict, z: bool) -> list[dict]:
    energy = info["energy"]
    if not energy:
        return []
    kwh = sum(e.get("kwh", 0) for e in energy.values())
    co2 = sum(e.get("co2_g", 0) for e in energy.values())
    secs = sum(e.get("seconds", 0) for e in energy.values())
    any_e = next(iter(energy.values()))
    grid, source = any_e.get("grid_g_per_kwh"), any_e.get("power_source", "")
    if z:  # energy.json says it in English: "estimate: 10 W/core × 2 cores"
        source = re.sub(r"estimate: ([\d.]+) W/core × (\d+) cores", r"估算:每核 \1 W × \2 核", source)
    what = (f"全部阶段的电能与 CO2({source},电网 {grid:g} g/kWh)" if z else
            f"energy and CO2 of every stage ({source}; grid {grid:g} g/kWh"
            + (", the world average)" if grid == 475 else ")"))
    kettle = "烧开一升水约 93 Wh" if z else "boiling a litre of water: about 93 Wh"
    result = f"**{1000 * kwh:.1f} Wh**, {co2:.1f} g CO2e"
    rows = [_row("energy", what, result, kettle, seconds(secs, "zh" if z else "en"))]
    if "auto_precision" in any_e:  # the numbers above hold for this kind of machine and precision (issue 20)
        where = ("得出以上数字的机器；`train.precision = \"auto\"` 在其上选定的精度（对齐部分的配置固定为 fp32）" if z
                 else "the machine every number above comes from, and the precision `train.precision = \"auto\"` "
                      "picked there (the alignment part's configs ask for fp32)")
        other = ("另一种 CPU 或精度：数字不同，见 docs/testing.md" if z else
                 "another CPU or precision: other numbers (docs/testing.md)")
        rows.append(_row("energy", where, f"{any_e['device']}: **{any_e['auto_precision']}**", other))
    return rows


def form_rows(info: dict, z: bool) -> list[dict]:
    from chatforge.report.summary_form import form_rows as rows  # it imports this module's helpers

    return rows(info, z)


def stage_rows(info: dict, lang: str = "en", missing: bool = False) -> list[dict]:
    """The summary rows in README order; with `missing`, one "not run yet" row for each absent stage."""
    z = lang == "zh"
    count = task_prompt_count(info)
    n = f"{count:,} " if count else ""
    builders = [("tokenizer", lambda: _tokenizer(info, z)), ("prepare", lambda: _prepare(info, z)),
                ("pretrain", lambda: _pretrain(info, z)), ("copy", lambda: _copy(info, z)),
                ("sft", lambda: _sft(info, z, n)),
                ("rm", lambda: _rm(info, z)), ("form", lambda: form_rows(info, z)), ("ppo", lambda: _ppo(info, z, n)),
                ("grpo", lambda: _grpo(info, z, n)), ("dpo", lambda: _dpo(info, z)),
                ("classify", lambda: _classify(info, z)), ("eval", lambda: _eval(info, z)),
                ("energy", lambda: _energy(info, z))]
    rows: list[dict] = []
    for stage, build in builders:
        got = build()
        for row in got:
            row["label"] = LABELS[lang][row["stage"]]
        if not got and missing and stage != "form" and not (stage in ("ppo", "grpo", "dpo") and info.get("form")):
            got = [{"stage": stage, "label": LABELS[lang][stage], "missing": True,
                    "command": COMMANDS[stage].replace("RUN", str(info["dir"]))}]
        rows += got
    return rows
