"""Build data/bench/wordnet_gloss.jsonl: "which word has this definition?" questions from WordNet 3.0.

Source (Debian 12): apt-get install wordnet-base  -> /usr/share/wordnet/{index,data}.{noun,verb,adj,adv}
Licence: the WordNet 3.0 licence (Princeton; permissive), see data/bench/SOURCES.md.

Each question takes a common word (one that occurs often in the demo corpus, so a model trained on it
has seen the word), the definition of its most frequent sense (WordNet's sense 1, not a proper name; the
example sentences after the first `;` and a leading "(domain)" are dropped), and three distractors of the
same part of speech that are neither the word's synonyms nor in the definition. Definitions that contain
the word (or a word of the same stem) are skipped.
Seeded: a rebuild from the same sources writes the same bytes.

  .venv/bin/python scripts/build_wordnet_bench.py [--wordnet /usr/share/wordnet] [--n 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "demo" / "corpus.jsonl.gz"
OUT = REPO / "data" / "bench" / "wordnet_gloss.jsonl"
POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
SHARE = {"noun": 0.5, "verb": 0.25, "adj": 0.15, "adv": 0.10}  # of the questions, by part of speech
MIN_COUNT = 20  # occurrences in the demo corpus for a word to count as common
WORD = re.compile(r"[a-z]+")


def corpus_counts(path: Path) -> Counter:
    counts: Counter = Counter()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            counts.update(WORD.findall(json.loads(line)["text"].lower()))
    return counts


def read_index(path: Path) -> dict[str, list[str]]:
    """lemma -> its synset offsets, most frequent sense first (the order of WordNet's index files)."""
    senses = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):  # the licence header
            continue
        f = line.split()
        n_synsets, n_pointers = int(f[2]), int(f[3])
        senses[f[0]] = f[6 + n_pointers : 6 + n_pointers + n_synsets]
    return senses


def read_data(path: Path) -> dict[str, tuple[list[str], str]]:
    """synset offset -> (its lemmas, its definition without the example sentences)."""
    synsets = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):
            continue
        head, _, gloss = line.partition(" | ")
        f = head.split()
        n_words = int(f[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", w) for w in f[4 : 4 + 2 * n_words : 2]]  # case kept: Milan, Tell
        definition = re.sub(r"^\([^)]*\) ", "", gloss.split(";")[0].strip())  # "(baseball) ..." -> "..."
        synsets[f[0]] = (lemmas, definition)
    return synsets


def related(word: str, token: str) -> bool:
    """Same word or same stem (king/kings, give/given, happy/happily), crudely."""
    if token == word:
        return True
    short, long_ = sorted((word, token), key=len)
    return len(short) >= 4 and long_.startswith(short[: max(4, len(short) - 2)])


def candidates(wordnet: Path, pos: str, counts: Counter) -> list[tuple[str, str, set[str]]]:
    """(word, definition, the word's synonyms in any sense) for every usable common word of one part of speech."""
    index, data = read_index(wordnet / f"index.{pos}"), read_data(wordnet / f"data.{pos}")
    out = []
    for word, offsets in sorted(index.items()):
        if not word.isalpha() or not word.isascii() or len(word) < 3 or counts[word] < MIN_COUNT:
            continue
        lemmas, definition = data[offsets[0]]
        if word not in lemmas:  # a proper noun (only "Milan" is in the synset), not a common word
            continue
        tokens = WORD.findall(definition.lower())
        if not 3 <= len(tokens) <= 20 or any(related(word, t) for t in tokens):
            continue
        synonyms = {lemma.lower() for o in offsets for lemma in data[o][0]}
        out.append((word, definition, synonyms))
    return out


def build(wordnet: Path, n: int, seed: int) -> list[dict]:
    counts = corpus_counts(CORPUS)
    rng = random.Random(seed)
    rows, used = [], set()
    for pos, share in SHARE.items():
        pool = candidates(wordnet, pos, counts)
        words = [w for w, _, _ in pool]
        picked = [c for c in rng.sample(pool, len(pool)) if c[0] not in used][: round(n * share)]
        for word, definition, synonyms in picked:
            used.add(word)
            tokens = set(WORD.findall(definition.lower()))
            distractors: list[str] = []
            while len(distractors) < 3:
                d = rng.choice(words)
                if d in synonyms or d in distractors or any(related(d, t) for t in tokens):
                    continue
                distractors.append(d)
            answer = rng.randrange(4)
            choices = distractors[:answer] + [word] + distractors[answer:]
            rows.append({"question": f"Which word is defined as: {definition}?\nAnswer:",
                         "choices": [" " + c for c in choices], "answer": answer, "pos": POS[pos]})
    rng.shuffle(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"), help="WordNet 3.0 dict folder")
    ap.add_argument("--n", type=int, default=300, help="number of questions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if not (args.wordnet / "data.noun").is_file():
        print(f"{args.wordnet}/data.noun not found: apt-get install wordnet-base, or pass --wordnet", file=sys.stderr)
        return 2
    rows = build(args.wordnet, args.n, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{args.out}: {len(rows)} questions ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
