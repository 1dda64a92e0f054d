"""The demo task, "verse on request": ask for a line that begins with a given word (or character),
answer with a real line of the corpus that does. A program checks every answer, so each stage can be
scored on held-out prompts whose keywords no training prompt ever asked for.

  Write a line that begins with the word "Crown".  -> a Shakespeare line whose first word is "Crown"
  写一句以「月」开头的五言诗句。                      -> a five-character line of a Tang poem starting with 月

Why "begins with" rather than "contains": answering a held-out keyword means copying it from the
prompt. At the first position of the reply that copy is one fixed-offset attention pattern, which the
demo's 4 M-parameter model learns in a few minutes of SFT; "somewhere in the line" it does not.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from pathlib import Path

from chatforge.eval.task import Task

CJK = re.compile(r"[\u4e00-\u9fff]")
WORD = re.compile(r"[a-z]+")
EN_PROMPT = 'Write a line that begins with the word "{kw}".'
ZH_PROMPT = "写一句以「{kw}」开头的{name}诗句。"
ZH_NAMES = {5: "五言", 7: "七言"}
EN_COPY = 'Repeat this line: "{line}"'
ZH_COPY = "重复这句诗：「{line}」"


def _held_out(keyword: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(keyword.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def english_lines(text: str) -> list[str]:
    """Lines of verse or prose dialogue: 5 to 12 words, no speaker names or stage directions."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        skip = line.isupper() or line.startswith(("[", "(", "SCENE", "Scene", "ACT", "Act ", "Enter", "Exit", "Exeunt"))
        if 5 <= len(words) <= 12 and not skip and line[0].isupper():
            out.append(line)
    return out


def chinese_lines(text: str) -> list[str]:
    """Five- or seven-character half lines of a poem (split at its punctuation)."""
    out = []
    for part in re.split(r"[，。！？；、,.!?;\s]+", text):
        if len(part) in ZH_NAMES and all(CJK.match(c) for c in part):
            out.append(part)
    return out


def check(row: dict, response: str) -> bool:
    """The constraint checker: the reward for GRPO and the judge for every held-out evaluation."""
    reply = response.strip()
    if row["kind"] == "copy":  # the copy phase: the line, exactly
        return reply == row["completion"]
    if not reply or "\n" in reply:
        return False
    if row["kind"] == "en":
        words = WORD.findall(reply.lower())
        return bool(words) and words[0] == row["keyword"].lower() and reply.lower().lstrip("'\"([").startswith(words[0])
    chars = CJK.findall(reply)
    rest = re.sub(r"[\u4e00-\u9fff，。！？；、,.!?;\s]", "", reply)
    return len(chars) == row["length"] and chars[0] == row["keyword"] and not rest


def reward(prompt: str, response: str, **row) -> float:
    """The checker as a reward function for `rl.reward=chatforge.tasks.verse:reward`: 1 if the reply
    meets the prompt's constraint, else 0."""
    return float(check({"prompt": prompt, **row}, response))


def language(row: dict) -> str:
    """The group a row's success also counts in: "en" or "zh" (the copy phase's rows carry "lang")."""
    return row.get("lang") or row["kind"]


# the demo's task, as `chatforge eval --task chatforge.tasks.verse:TASK` (the default) finds it
TASK = Task(check, language)


def corpus_lines(corpus: str | Path) -> tuple[list[str], list[str]]:
    """The corpus's distinct English task lines (Shakespeare) and Chinese half lines (Tang and Song), sorted."""
    en: set[str] = set()
    zh: set[str] = set()
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc["source"] == "shakespeare":
                en.update(english_lines(doc["text"]))
            elif doc["source"] in ("tang", "song"):
                zh.update(chinese_lines(doc["text"]))
    return sorted(en), sorted(zh)


def build_tasks(corpus: str | Path, out: str | Path, held_out_fraction: float = 0.2, per_keyword: int = 3,
                seed: int = 0, fresh_keywords: int = 1500) -> dict[str, int]:
    """Write sft_{train,val}.jsonl, prefs_{train,val}.jsonl and prompts_{train,heldout}.jsonl (val and
    heldout: the held-out keywords), the copy phase's copy_{train,val}.jsonl, sft_replay.jsonl (the
    demo's SFT data: sft_train's rows plus as many copy rows), the RL prompts prompts_rl.jsonl, their
    preference pairs prefs_rl.jsonl (DPO's) and prefs_rm.jsonl (the reward model's: prefs_train plus
    prefs_rl); see `copy_rows`, `rl_prompts` and `rl_pairs`.

    Each row: {"prompt", "completion", "keyword", "kind", "length", "answers"}: `answers` counts the
    real lines that would satisfy the prompt."""
    en, zh = corpus_lines(corpus)
    by_word: dict[str, list[str]] = {}
    for line in en:
        first = re.match(r"[A-Za-z]+", line)
        if first and len(first.group()) >= 3:
            by_word.setdefault(first.group().capitalize(), []).append(line)
    by_char: dict[tuple[str, int], list[str]] = {}
    for line in zh:
        by_char.setdefault((line[0], len(line)), []).append(line)
    rng = random.Random(seed)
    rows = []
    for w, lines in sorted(by_word.items()):
        if len(lines) >= 4:
            for answer in rng.sample(lines, min(per_keyword, len(lines))):
                rows.append({"prompt": EN_PROMPT.format(kw=w), "completion": answer, "keyword": w, "kind": "en",
                             "length": 0, "answers": len(lines)})
    for (c, n), lines in sorted(by_char.items()):
        if len(lines) >= 2:
            for answer in rng.sample(lines, min(per_keyword, len(lines))):
                rows.append({"prompt": ZH_PROMPT.format(kw=c, name=ZH_NAMES[n]), "completion": answer, "keyword": c,
                             "kind": "zh", "length": n, "answers": len(lines)})
    pair_rng = random.Random(seed + 1)  # its own stream: the SFT rows stay as they were
    for r in rows:  # a preference pair: the real answer, and a real line that breaks the prompt's constraint
        if r["kind"] == "en":
            r["rejected"] = pair_rng.choice([x for x in pair_rng.sample(en, 20) if not check(r, x)])
        else:
            other_length = by_char.get((r["keyword"], 12 - r["length"]))  # the keyword, but 7 for 5 or 5 for 7
            pool = other_length or [x for x in pair_rng.sample(zh, 20) if len(x) == r["length"] and not check(r, x)]
            r["rejected"] = pair_rng.choice(pool)
    train = [r for r in rows if not _held_out(r["keyword"], held_out_fraction)]
    val = [r for r in rows if _held_out(r["keyword"], held_out_fraction)]
    rng.shuffle(train)
    rng.shuffle(val)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, items: list[dict]) -> None:
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items), encoding="utf-8")

    def unique_prompts(items: list[dict]) -> list[dict]:
        seen, result = set(), []
        for r in items:
            if r["prompt"] not in seen:
                seen.add(r["prompt"])
                result.append({k: v for k, v in r.items() if k not in ("completion", "rejected")})
        return result

    def prefs(items: list[dict]) -> list[dict]:
        return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["rejected"]} for r in items]

    sft_rows = [{k: v for k, v in r.items() if k != "rejected"} for r in train]
    train_prefs = prefs(train)
    write("sft_train.jsonl", sft_rows)
    write("sft_val.jsonl", [{k: v for k, v in r.items() if k != "rejected"} for r in val])
    write("prefs_train.jsonl", train_prefs)
    write("prefs_val.jsonl", prefs(val))
    train_prompts, heldout_prompts = unique_prompts(train), unique_prompts(val)
    write("prompts_train.jsonl", train_prompts)
    write("prompts_heldout.jsonl", heldout_prompts)
    held = {r["keyword"] for r in val}
    copy_train, copy_val = copy_rows(en, zh, held, seed)
    write("copy_train.jsonl", copy_train)
    write("copy_val.jsonl", copy_val)
    # the task's SFT rows and as many copy rows, replayed so that SFT keeps the copy (docs/sft.md)
    replay = sft_rows + random.Random(seed + 3).sample(copy_train, len(train))
    random.Random(seed + 4).shuffle(replay)
    write("sft_replay.jsonl", replay)
    rl = rl_prompts(en, zh, by_word, by_char, fresh_keywords, seed)
    write("prompts_rl.jsonl", rl)
    rl_prefs = rl_pairs(rl, en, zh, by_word, by_char, seed)
    write("prefs_rl.jsonl", rl_prefs)
    rm_prefs = train_prefs + rl_prefs  # the reward model's: the task's pairs and the RL keywords'
    random.Random(seed + 5).shuffle(rm_prefs)
    write("prefs_rm.jsonl", rm_prefs)
    return {"sft_train": len(train), "sft_val": len(val), "prompts_train": len(train_prompts),
            "prompts_heldout": len(heldout_prompts), "copy_train": len(copy_train), "sft_replay": len(replay),
            "prompts_rl": len(rl), "prefs_rl": len(rl_prefs)}


def copy_rows(en: list[str], zh: list[str], held_out: set[str], seed: int = 0, val_lines: int = 200,
              en_lines: int = 36_000, zh_shuffles: int = 3) -> tuple[list[dict], list[dict]]:
    """The copy phase's rows: "Repeat this line: ..." -> the line, for corpus lines that do not begin
    with a held-out keyword (its first word, or its first character), so no training reply ever starts
    with one and no training prompt asks for one.

    Why: a reply that begins with a keyword the model has never been asked for must copy it from the
    prompt, and the demo's pre-trained model cannot copy (scripts/induction_probe.py: no induction head).
    Repeating tens of thousands of distinct lines, each seen about once, teaches copying as a skill rather
    than as memorised lines. Lines with a held-out keyword further in are kept: copying those tokens is
    the generic skill, and without them no held-out Chinese character is ever copied (docs/sft.md).

    Chinese: the corpus has only ~3,200 distinct half lines against ~73,000 English ones; at their natural
    share (4%) the model never learns to copy Chinese at all (none of its held-out Chinese lines). So every Chinese
    line also comes `zh_shuffles` times with its characters shuffled (none starting with a held-out
    keyword): real characters in an order no poem has, which can only be repeated by copying, not
    recalled. English is capped at `en_lines` lines so Chinese is about a quarter of the rows.
    Returns (train, val); val is half English and half Chinese real lines, none of them in train."""

    def first(line: str) -> str:  # the word (English) or character (Chinese) a line begins with
        words = WORD.findall(line.lower())
        return line[0] if CJK.match(line[0]) else (words[0] if words else "")

    held = {k.lower() for k in held_out}
    rng = random.Random(seed)
    keep_en = [x for x in en if first(x) not in held]
    keep_zh = [x for x in zh if first(x) not in held]
    rng.shuffle(keep_en)
    rng.shuffle(keep_zh)
    half = val_lines // 2
    val_en, train_en = keep_en[:half], keep_en[half:half + en_lines]
    val_zh, train_zh = keep_zh[:val_lines - half], keep_zh[val_lines - half:]
    shuffled = []
    for line in train_zh:
        for _ in range(zh_shuffles):
            chars = list(line)
            rng.shuffle(chars)
            if chars[0] not in held:
                shuffled.append("".join(chars))
    held_lines = set(val_zh)
    shuffled = [x for x in shuffled if x not in held_lines]

    def rows(en_part: list[str], zh_part: list[str]) -> list[dict]:
        items = [{"prompt": EN_COPY.format(line=x), "completion": x, "kind": "copy", "lang": "en"} for x in en_part]
        items += [{"prompt": ZH_COPY.format(line=x), "completion": x, "kind": "copy", "lang": "zh"} for x in zh_part]
        rng.shuffle(items)
        return items

    return rows(train_en, train_zh + shuffled), rows(val_en, val_zh)


def rl_prompts(en: list[str], zh: list[str], by_word: dict[str, list[str]], by_char: dict[tuple[str, int], list[str]],
               fresh_keywords: int, seed: int = 0) -> list[dict]:
    """Prompts for PPO and GRPO, on keywords no SFT or held-out prompt asks for: the `fresh_keywords`
    English words most frequent in the corpus's lines among those that begin only 1 to 3 of them (too few
    to be a task keyword), and the `fresh_keywords // 3` most frequent Chinese characters that begin
    fewer than two half lines of each length, each asked for at five and at seven characters.

    Why fresh words: SFT has memorised an answer for every training keyword, so on those prompts the
    policy already succeeds or never will, and RL has little to learn. On words it was never taught,
    success needs the copy itself, and that is what RL can improve and what carries to held-out
    keywords. Why frequent ones: held-out keywords are common words (they begin four lines or more); rare
    words are longer and split into more tokens, a different copy (docs/rlhf.md)."""
    frequency: dict[str, int] = {}
    for line in en:
        for w in re.findall(r"[A-Za-z]+", line):
            frequency[w.capitalize()] = frequency.get(w.capitalize(), 0) + 1
    for line in zh:
        for c in line:
            frequency[c] = frequency.get(c, 0) + 1
    rare = sorted(w for w, lines in by_word.items() if len(lines) < 4)
    words = sorted(rare, key=lambda w: -frequency.get(w, 0))[:fresh_keywords]
    rows = [{"prompt": EN_PROMPT.format(kw=w), "keyword": w, "kind": "en", "length": 0,
             "answers": len(by_word[w])} for w in words]
    task_chars = {c for (c, n), lines in by_char.items() if len(lines) >= 2}
    chars = sorted((c for c in frequency if CJK.match(c) and c not in task_chars), key=lambda c: (-frequency[c], c))
    rows += [{"prompt": ZH_PROMPT.format(kw=c, name=ZH_NAMES[n]), "keyword": c, "kind": "zh", "length": n,
              "answers": len(by_char.get((c, n), []))} for c in chars[:fresh_keywords // 3] for n in ZH_NAMES]
    random.Random(seed + 2).shuffle(rows)
    return rows


def rl_pairs(rl: list[dict], en: list[str], zh: list[str], by_word: dict[str, list[str]],
             by_char: dict[tuple[str, int], list[str]], seed: int = 0) -> list[dict]:
    """Preference pairs on the RL prompts' keywords: for every real line that answers one, chosen = that
    line, rejected = a real line (Chinese: of the asked length) that breaks the constraint.

    Why: DPO on the task's own pairs ranks them well but costs held-out success, as SFT's memorising did;
    on keywords SFT never saw, what separates chosen from rejected is the copy (docs/rlhf.md). The reward
    model trains on these and the task's pairs together (prefs_rm.jsonl)."""
    rng = random.Random(seed + 6)
    pairs = []
    zh_of_length = {n: [x for x in zh if len(x) == n] for n in ZH_NAMES}
    for row in rl:
        if row["kind"] == "en":
            answers, pool = by_word.get(row["keyword"], []), en
        else:
            answers, pool = by_char.get((row["keyword"], row["length"]), []), zh_of_length[row["length"]]
        for line in answers:
            rejected = rng.choice([x for x in rng.sample(pool, 20) if not check(row, x)])
            pairs.append({"prompt": row["prompt"], "chosen": line, "rejected": rejected})
    return pairs


def build_source_labels(corpus: str | Path, out: str | Path, per_class: int = 1500, val_fraction: float = 0.2,
                        seed: int = 0) -> dict[str, int]:
    """Which source is this line from? {"text", "label"} rows for the classification stage: a
    Shakespeare line, a KJV verse, or a line of a Chinese poem, balanced, split by hash of the text."""
    pools: dict[str, set[str]] = {"shakespeare": set(), "kjv": set(), "poem": set()}
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc["source"] == "shakespeare":
                pools["shakespeare"].update(english_lines(doc["text"]))
            elif doc["source"] == "kjv":
                pools["kjv"].update(v for v in doc["text"].splitlines() if 5 <= len(v.split()) <= 30)
            else:
                pools["poem"].update(chinese_lines(doc["text"]))
    rng = random.Random(seed)
    rows = []
    for label, pool in pools.items():
        rows += [{"text": t, "label": label} for t in rng.sample(sorted(pool), min(per_class, len(pool)))]
    rng.shuffle(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"classify_train.jsonl": [r for r in rows if not _held_out(r["text"], val_fraction)],
              "classify_val.jsonl": [r for r in rows if _held_out(r["text"], val_fraction)]}
    for name, items in splits.items():
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items), encoding="utf-8")
    return {name: len(items) for name, items in splits.items()}
