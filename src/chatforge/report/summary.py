"""The per-stage summary rows: the README's "Results" table, rebuilt from what a run folder holds.

One function per stage turns the run's files into rows of (what is measured, result, baseline, time), in
English or Chinese (their words: report/strings.py, one table per language), so `chatforge report --readme` can keep the
README's table in step with the latest run instead of someone copying numbers by hand.
"""

from __future__ import annotations

import re

from chatforge.report.load import model_metrics, series, stage_seconds, task_prompt_count
from chatforge.report.strings import TEXT

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
    return TEXT[lang]["seconds"].format(f"{s:.1f}" if s < 20 else f"{s:,.0f}")


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


def _paren(text: str, t: dict) -> str:
    """English " (text)", Chinese "(text)" with no space (as README.zh-CN.md writes it), "" for no text."""
    return t["paren"].format(text) if text else ""


def _time(info: dict, stage: str, t: dict) -> str:
    return seconds(stage_seconds(info, stage), t["lang"])


def _tokenizer(info: dict, t: dict) -> list[dict]:
    meta, time = info["data_meta"], _time(info, "tokenizer", t)
    if not (meta or info["has_tokenizer"] or time):
        return []
    val, train = meta.get("val", {}), meta.get("train", {})
    vocab = f"{meta['vocab_size']:,}" if isinstance(meta.get("vocab_size"), int) else "?"
    mb = (train.get("bytes", 0) + val.get("bytes", 0)) / 1e6
    ratio = val["bytes"] / val["tokens"] if val.get("tokens") else None
    result = t["bytes_per_token"].format(num(ratio, 2)) if ratio else DASH
    return [_row("tokenizer", t["tokenizer_what"].format(vocab=vocab, mb=mb), result, t["tokenizer_base"], time)]


def _prepare(info: dict, t: dict) -> list[dict]:
    meta = info["data_meta"]
    if not meta:
        return []
    tr, va = meta.get("train", {}), meta.get("val", {})
    what = t["prepare_what"].format(train=tr.get("documents", 0), val=va.get("documents", 0))
    result = t["prepare_result"].format(_si(tr.get("tokens", 0)), _si(va.get("tokens", 0)))
    return [_row("prepare", what, result, "", _time(info, "data", t))]


def _pretrain(info: dict, t: dict) -> list[dict]:
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
    parts = [t["params"].format(params / 1e6)] if params else []
    if style:
        parts.append(t["style"].format(style))
    if train.get("steps") and train.get("batch_size") and model.get("context"):
        per_step = train["batch_size"] * train.get("grad_accum", 1) * model["context"]
        parts.append(t["steps"].format(steps=train["steps"], tokens=per_step))
    what = t["pretrain_what"] + _paren(t["comma"].join(parts), t)
    result = f"**{num(bpb, 3)}** bpb" + (_paren(t["nats"].format(num(loss, 3)), t) if loss is not None else "")
    base = ""
    if uni is not None:
        base = t["unigram"].format(num(uni, 3)) + (_paren(t["nats"].format(num(ent, 3)), t) if ent is not None else "")
    return [_row("pretrain", what, result, base, _time(info, "pretrain", t))]


def _copy(info: dict, t: dict) -> list[dict]:
    copy_eval = info["stage_eval"].get("copy", {})
    exact = _first(_num(copy_eval, "copy_exact"), _num(info["results"], "copy_exact"))
    if exact is None:
        return []
    result = f"**{pct(exact)}**"
    en, zh = _num(copy_eval, "copy_exact_en"), _num(copy_eval, "copy_exact_zh")
    if en is not None and zh is not None:
        result += " " + t["lang_named"].format(pct(en), pct(zh)).lstrip()
    return [_row("copy", t["copy_what"], result, t["copy_base"], _time(info, "copy", t))]


def _sft(info: dict, t: dict, n: str) -> list[dict]:
    sft, base = model_metrics(info, "sft"), model_metrics(info, "base")
    if "sft" not in info["stages"] and not sft:
        return []
    what2, basel = t["sft_success"].format(n=n), t["base_model"]
    result2, base2 = f"**{pct(_num(sft, 'success'))}**", f"{basel} {pct(_num(base, 'success'))}"
    if _by_lang(sft):
        what2 += t["all_en_zh"]
        result2 += " / " + " / ".join(pct(x) for x in _by_lang(sft))
    return [_row("sft", t["sft_end"].format(n=n), f"**{pct(_num(sft, 'end_rate'))}**",
                 f"{basel} {pct(_num(base, 'end_rate'))}", _time(info, "sft", t)),
            _row("sft", what2, result2, base2, t["same"])]


def _rm(info: dict, t: dict) -> list[dict]:
    ev = info["stage_eval"].get("rm", {})
    acc = _first(_num(ev, "val_accuracy"), _num(info["results"], "rm_accuracy"))
    if "rm" not in info["stages"] and acc is None:
        return []
    pairs = ev.get("val_pairs")
    what = t["rm_what"].format(pairs=t["rm_pairs"].format(pairs) if pairs else "")
    return [_row("rm", what, f"**{pct(acc)}**", t["chance_50"], _time(info, "rm", t))]


def _ppo(info: dict, t: dict, n: str) -> list[dict]:
    ppo, sft = model_metrics(info, "ppo"), model_metrics(info, "sft")
    if "ppo" not in info["stages"] and not ppo:
        return []
    kl = _first(_num(ppo, "kl"), _num(info["results"], "ppo_kl"), _num(info["stage_eval"].get("ppo", {}), "val_kl"))
    result = pct(_num(ppo, "success")) + (t["ppo_kl"].format(num(kl, 2)) if kl is not None else "")
    rows = [_row("ppo", t["ppo_what"].format(n=n), result, f"SFT {pct(_num(sft, 'success'))}", _time(info, "ppo", t))]
    _, rewards = series(info["metrics"].get("ppo", []), "reward")
    first = _first(_num(info["results"], "ppo_reward_first"), rewards[0] if rewards else None)
    last = _first(_num(info["results"], "ppo_reward_last"), sum(rewards[-5:]) / len(rewards[-5:]) if rewards else None)
    if first is not None and last is not None:
        rows.append(_row("ppo", t["ppo_reward"], f"**{num(first, 2)} → {num(last, 2)}**", "", t["same"],
                         split="fresh training prompts of each round (not held out)"))
    if _by_lang(ppo):
        sft_lang = " / ".join(pct(x) for x in _by_lang(sft)) if _by_lang(sft) else DASH
        rows.append(_row("ppo", t["by_language"], " / ".join(pct(x) for x in _by_lang(ppo)), f"SFT {sft_lang}"))
    return rows


def _lang_note(m: dict, t: dict, named: bool) -> str:
    lang = _by_lang(m)
    if not lang:
        return ""
    return t["lang_named" if named else "lang_pair"].format(pct(lang[0]), pct(lang[1]))


def _grpo(info: dict, t: dict, n: str) -> list[dict]:
    grpo, sft = model_metrics(info, "grpo"), model_metrics(info, "sft")
    if "grpo" not in info["stages"] and not grpo:
        return []
    kl = _first(_num(grpo, "kl"), _num(info["results"], "grpo_kl"), _num(info["stage_eval"].get("grpo", {}), "val_kl"))
    result = f"**{pct(_num(grpo, 'success'))}**{_lang_note(grpo, t, True)}" + \
        (t["sep"] + f"KL {num(kl, 2)}" if kl is not None else "")
    base = f"SFT {pct(_num(sft, 'success'))}{_lang_note(sft, t, False)}"
    return [_row("grpo", t["grpo_what"].format(n=n), result, base, _time(info, "grpo", t))]


def _dpo(info: dict, t: dict) -> list[dict]:
    dpo, sft, ev = model_metrics(info, "dpo"), model_metrics(info, "sft"), info["stage_eval"].get("dpo", {})
    acc = _first(_num(ev, "val_reward_accuracy"), _num(info["results"], "dpo_preference_accuracy"))
    if "dpo" not in info["stages"] and acc is None and not dpo:
        return []
    pairs = ev.get("val_pairs") or info["counts"]["prefs_val"]
    what = t["dpo_what"].format(pairs=t["dpo_pairs"].format(pairs) if pairs else "")
    result = f"**{pct(acc)}**{t['sep']}{pct(_num(dpo, 'success'))}{_lang_note(dpo, t, False)}"
    return [_row("dpo", what, result, t["dpo_base"].format(pct(_num(sft, "success"))), _time(info, "dpo", t))]


def _classify(info: dict, t: dict) -> list[dict]:
    ev = info["stage_eval"].get("classify", {})
    acc = _first(_num(ev, "val_accuracy"), _num(info["results"], "classify_accuracy"))
    if "classify" not in info["stages"] and acc is None:
        return []
    major = _first(_num(ev, "majority_baseline"), _num(info["results"], "classify_majority"))
    k = len(ev.get("labels", []))
    lines = sum(map(sum, ev["confusion"])) if isinstance(ev.get("confusion"), list) else None
    what = t["classify_what"].format(classes=t["classes"].format(k) if k else "",
                                     lines=t["lines"].format(lines) if lines else "")
    return [_row("classify", what, f"**{pct(acc)}**", t["majority"].format(pct(major)), _time(info, "classify", t))]


def _by_model(info: dict, key: str, fmt, names: tuple[str, ...]) -> str:
    """"base 25.3% / SFT 31.0% / PPO 30.3%" for the models that have `key`."""
    shown = [f"{'base' if n == 'base' else n.upper()} {fmt(model_metrics(info, n)[key])}" for n in names
             if key in model_metrics(info, n)]
    return " / ".join(shown)


def _eval(info: dict, t: dict) -> list[dict]:
    models = tuple(info["eval"].get("models", {}))
    if not models:
        return []
    rows, chance = [], _num(info["eval"].get("chance", {}), "choice")
    bpb = _by_model(info, "bpb", lambda x: num(x, 3), models)
    if bpb:
        rows.append(_row("eval", t["bpb_what"], bpb, t["bpb_base"]))
    choice = _by_model(info, "choice_accuracy", pct, models)
    if choice:
        n = next((m["choice_questions"] for m in info["eval"].get("models", {}).values()
                  if isinstance(m, dict) and m.get("choice_questions")), None)  # absent in older eval.json
        rows.append(_row("eval", t["choice_what"].format(n=t["questions"].format(n) if n else ""), choice,
                         t["chance"].format(pct(chance))))
    aligned = tuple(n for n in models if n not in ("base", "sft"))
    win = _by_model(info, "rm_win_rate", pct, ("base", *aligned))
    if win:
        rows.append(_row("eval", t["win_what"], win, t["win_base"]))
    auc = _by_model(info, "rm_auc", pct, tuple(n for n in models if n != "base"))
    if auc:
        rows.append(_row("eval", t["auc_what"], auc, t["auc_base"]))
    toxic = _by_model(info, "toxic_rate", pct, models)
    refusal = _by_model(info, "refusal_rate", pct, models)
    if toxic:
        harms = info["eval"].get("harms", {}).get("prompts")
        rows.append(_row("eval", t["harms_what"].format(harms), f"{toxic}; {refusal}", t["harms_base"],
                         _time(info, "eval", t)))
    return rows


def _energy(info: dict, t: dict) -> list[dict]:
    energy = info["energy"]
    if not energy:
        return []
    kwh = sum(e.get("kwh", 0) for e in energy.values())
    co2 = sum(e.get("co2_g", 0) for e in energy.values())
    secs = sum(e.get("seconds", 0) for e in energy.values())
    any_e = next(iter(energy.values()))
    grid, source = any_e.get("grid_g_per_kwh"), any_e.get("power_source", "")
    source = re.sub(r"estimate: ([\d.]+) W/core × (\d+) cores", t["estimate"], source)  # energy.json's words
    what = t["energy_what"].format(source=source, grid=grid, world=t["world_average"] if grid == 475 else "")
    rows = [_row("energy", what, f"**{1000 * kwh:.1f} Wh**, {co2:.1f} g CO2e", t["kettle"], seconds(secs, t["lang"]))]
    if "auto_precision" in any_e:  # the numbers above hold for this kind of machine and precision (issue 20)
        rows.append(_row("energy", t["machine"], f"{any_e['device']}: **{any_e['auto_precision']}**",
                         t["machine_other"]))
    return rows


def form_rows(info: dict, t: dict) -> list[dict]:
    from chatforge.report.summary_form import form_rows as rows  # it imports this module's helpers

    return rows(info, t)


def stage_rows(info: dict, lang: str = "en", missing: bool = False) -> list[dict]:
    """The summary rows in README order; with `missing`, one "not run yet" row for each absent stage."""
    t = TEXT[lang]
    count = task_prompt_count(info)
    n = f"{count:,} " if count else ""
    builders = [("tokenizer", lambda: _tokenizer(info, t)), ("prepare", lambda: _prepare(info, t)),
                ("pretrain", lambda: _pretrain(info, t)), ("copy", lambda: _copy(info, t)),
                ("sft", lambda: _sft(info, t, n)),
                ("rm", lambda: _rm(info, t)), ("form", lambda: form_rows(info, t)), ("ppo", lambda: _ppo(info, t, n)),
                ("grpo", lambda: _grpo(info, t, n)), ("dpo", lambda: _dpo(info, t)),
                ("classify", lambda: _classify(info, t)), ("eval", lambda: _eval(info, t)),
                ("energy", lambda: _energy(info, t))]
    rows: list[dict] = []
    for stage, build in builders:
        got = build()
        for row in got:
            row["label"] = t["labels"][row["stage"]]
        if not got and missing and stage != "form" and not (stage in ("ppo", "grpo", "dpo") and info.get("form")):
            got = [{"stage": stage, "label": t["labels"][stage], "missing": True,
                    "command": COMMANDS[stage].replace("RUN", str(info["dir"]))}]
        rows += got
    return rows
