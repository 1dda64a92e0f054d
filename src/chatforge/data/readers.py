"""Read documents from .txt, .jsonl and .parquet files (optionally .gz), with file:line errors.

A .txt file's documents are separated by blank lines; a .jsonl row or a .parquet row is one document.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from chatforge.errors import ChatforgeError

FORMATS = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")


def _format(path: Path) -> str:
    name = path.name.lower()
    for fmt in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(fmt):
            return fmt
    raise ChatforgeError(f"{path}: unknown file type; use one of {', '.join(FORMATS)}")


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else path.open(encoding="utf-8")


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files given directly, or every readable file inside a given folder, sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and any(f.name.lower().endswith(x) for x in FORMATS))
            if not found:
                raise ChatforgeError(f"{p}: folder has no {', '.join(FORMATS)} files")
            files += found
        elif p.is_file():
            _format(p)
            files.append(p)
        else:
            raise ChatforgeError(f"{p}: no such file or folder")
    return files


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-empty line; a line that is not a JSON object names file:line."""
    with _open_text(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChatforgeError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ChatforgeError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                yield lineno, row
        except UnicodeDecodeError as e:
            raise ChatforgeError(f"{path}: not UTF-8 text ({e.reason}); convert it to UTF-8") from None


def _text_field(path: Path, lineno: int, row: dict) -> str:
    text = row.get("text")
    if not isinstance(text, str):
        raise ChatforgeError(f"{path}:{lineno}: row needs a string field \"text\" (has: {', '.join(row) or 'nothing'})")
    return text


def read_documents(path: str | Path) -> Iterator[str]:
    """Yield the documents of one file, in order."""
    path = Path(path)
    fmt = _format(path)
    if fmt.startswith(".jsonl"):
        for lineno, row in read_jsonl(path):
            yield _text_field(path, lineno, row)
    elif fmt == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ChatforgeError(f"{path}: parquet file needs a 'text' column (has: {', '.join(table.column_names)})")
        for text in table.column("text").to_pylist():
            if text:
                yield text
    else:
        try:
            with _open_text(path) as f:
                doc: list[str] = []
                for line in f:
                    if line.strip():
                        doc.append(line)
                    elif doc:
                        yield "".join(doc).rstrip("\n")
                        doc = []
                if doc:
                    yield "".join(doc).rstrip("\n")
        except UnicodeDecodeError as e:
            raise ChatforgeError(f"{path}: not UTF-8 text ({e.reason}); convert it to UTF-8") from None


def iter_corpus(paths: list[str | Path]) -> Iterator[str]:
    """Every non-empty document of every file; raises if the whole corpus has no text."""
    n = 0
    for path in expand_paths(paths):
        for doc in read_documents(path):
            if doc.strip():
                n += 1
                yield doc
    if n == 0:
        raise ChatforgeError(f"{', '.join(map(str, paths))}: the corpus has no text")
