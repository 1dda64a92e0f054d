"""The RL task, "verse in a form": a line that begins with a given word and ends the way the prompt asks.

  Write a line that begins with the word "Crown" and ends with a question mark.
      -> a real Shakespeare line that begins with "Crown" and ends with "?"
  写一句以「月」开头的七言诗句，以「。」结尾。
      -> a real seven-character half line of a Tang or Song poem, starting with 月, with the 。 after it

The gold judge (`check`, standing in for InstructGPT's labellers) scores the form the prompt asks for:
one line of at least four words (Chinese: five or seven characters, as asked) that ends with the requested
mark. It does not score the keyword, which
the copy phase already teaches and which no amount of sampling improves (docs/rlhf.md).

Why this task gives RL something to learn: SFT sees few demonstrations of it (`demos` per keyword and
mark), so the SFT model ends its line the requested way only sometimes; among its samples some do. That
is InstructGPT's premise: demonstrations are scarce, comparisons of the model's own replies are cheap.
And why a reward model can judge it: the mark is the reply's last token, exactly where the reward
model's head reads; it only has to match it against the prompt's request.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

from chatforge.eval.task import Task
from chatforge.tasks.verse import CJK, ZH_NAMES, _held_out, corpus_lines

PROMPT = 'Write a line that begins with the word "{kw}" and ends with {mark}.'
MARKS = {"?": "a question mark", "!": "an exclamation mark", ".": "a full stop"}
ZH_PROMPT = "写一句以「{kw}」开头的{name}诗句，以「{mark}」结尾。"
ZH_MARKS = ("，", "。")
ZH_LINE = re.compile(r"(?<![\u4e00-\u9fff])([\u4e00-\u9fff]{5}|[\u4e00-\u9fff]{7})([，。])")


def check(row: dict, response: str) -> bool:
    """The gold judge: one line that ends with the requested mark; English at least four words before
    it, Chinese exactly the requested five or seven characters and nothing else."""
    reply = response.strip()
    if "\n" in reply or not reply.endswith(row["end"]):
        return False
    if row["kind"] == "form_zh":
        return len(reply) == row["length"] + 1 and all(CJK.match(c) for c in reply[:-1])
    return len(reply.split()) >= 4 and not reply[:-1].endswith(tuple(MARKS))


def chinese_lines_with_marks(corpus: str | Path) -> list[str]:
    """Five- or seven-character half lines of the Tang and Song poems, with the ， or 。 that follows."""
    out: set[str] = set()
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if doc["source"] in ("tang", "song"):
                out.update(m.group(1) + m.group(2) for m in ZH_LINE.finditer(doc["text"]))
    return sorted(out)


def reward(prompt: str, response: str, **row) -> float:
    """`check` as a reward function (`chatforge.tasks.form:reward`): 1 or 0."""
    return float(check(row, response))


# the alignment part's task, as `chatforge eval --task chatforge.tasks.form:TASK` finds it; grouped by
# language ("form_en" -> "en")
TASK = Task(check, lambda row: row["kind"].removeprefix("form_"))


def build_form_tasks(corpus: str | Path, out: str | Path, demos: int = 1, held_out_fraction: float = 0.2,
                     seed: int = 0) -> dict[str, int]:
    """Write form_sft.jsonl (at most `demos` real lines per training keyword and mark), form_rl.jsonl (RL
    prompts: training keywords, every mark) and form_heldout.jsonl (held-out keywords, as verse's split)."""
    en, _ = corpus_lines(corpus)
    by_key: dict[tuple, list[str]] = {}  # (word, mark) or (character, length, mark) -> real lines
    for line in en:
        first = re.match(r"[A-Za-z]+", line)
        if first and len(first.group()) >= 3 and line[-1] in MARKS:
            by_key.setdefault((first.group().capitalize(), line[-1]), []).append(line)
    for line in chinese_lines_with_marks(corpus):
        by_key.setdefault((line[0], len(line) - 1, line[-1]), []).append(line)
    prompts = [{"prompt": PROMPT.format(kw=w, mark=name), "keyword": w, "kind": "form_en", "end": mark}
               for w in sorted({k[0] for k in by_key if len(k) == 2}) for mark, name in MARKS.items()]
    prompts += [{"prompt": ZH_PROMPT.format(kw=c, name=ZH_NAMES[n], mark=mark), "keyword": c, "kind": "form_zh",
                 "length": n, "end": mark} for c, n in sorted({k[:2] for k in by_key if len(k) == 3})
                for mark in ZH_MARKS]
    rng = random.Random(seed)
    sft, rl, held = [], [], []
    for row in prompts:
        key = (row["keyword"], row["end"]) if row["kind"] == "form_en" else (row["keyword"], row["length"], row["end"])
        lines = by_key.get(key, [])
        row["answers"] = len(lines)
        if _held_out(row["keyword"], held_out_fraction):
            if lines:  # a held-out prompt the corpus can answer
                held.append(row)
            continue
        rl.append(row)
        for answer in rng.sample(lines, min(demos, len(lines))):
            sft.append(row | {"completion": answer})
    for items in (sft, rl, held):
        rng.shuffle(items)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, items in (("form_sft.jsonl", sft), ("form_rl.jsonl", rl), ("form_heldout.jsonl", held)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items), encoding="utf-8")
    return {"form_sft": len(sft), "form_rl": len(rl), "form_heldout": len(held)}
