"""`chatforge chat`: a multi-turn REPL over any chat model, replies streamed as they are decided.

Commands: /reset (forget the conversation), /system TEXT (set the system message), /quit (or Ctrl-D).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from tokenizers import Tokenizer

from chatforge.model.generate import Sampling, stream_text
from chatforge.model.transformer import Transformer
from chatforge.tokenizer import encode, render_chat

HELP = "commands: /reset  /system TEXT  /quit"


def fit_context(tok: Tokenizer, messages: list[dict], budget: int) -> list[dict]:
    """Drop the oldest turns (never the system message) until the prompt fits in `budget` tokens."""
    messages = list(messages)
    while len(messages) > 1 and len(encode(tok, render_chat(messages, add_generation_prompt=True))) > budget:
        drop = 1 if messages[0]["role"] == "system" and len(messages) > 2 else 0
        messages.pop(drop)
    return messages


def chat_loop(model: Transformer, tok: Tokenizer, s: Sampling, read: Callable[[str], str] = input,
              out: TextIO = sys.stdout, system: str | None = None, compile: bool = False) -> list[dict]:
    """Run the REPL until /quit or end of input; returns the conversation as it stood."""
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    out.write(f"chatforge chat ({HELP})\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            messages = list(base)
            out.write("(conversation reset)\n")
            continue
        if text.startswith("/system"):
            base = [{"role": "system", "content": text[len("/system"):].strip()}]
            messages = base + [m for m in messages if m["role"] != "system"]
            out.write("(system message set)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        messages.append({"role": "user", "content": text})
        messages = fit_context(tok, messages, model.cfg.context - s.max_new_tokens)
        out.write("assistant> ")
        pieces = []
        for piece in stream_text(model, tok, render_chat(messages, add_generation_prompt=True), s, compile=compile):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces)})
    return messages
