"""Chat data for SFT: validate every row before training, render ChatML, mask all but the assistant's tokens.

Rows are `{"messages": [{"role", "content"}, ...]}` (system/user/assistant, multi-turn) or
`{"prompt", "completion"}` (one user turn, one assistant turn). The loss covers each assistant turn's
content and its closing <|im_end|>; the system and user turns, and the role headers, are context only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from chatforge.data.readers import read_jsonl
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import IM_END, IM_START, PAD
from chatforge.train.distributed import rank_slice

ROLES = ("system", "user", "assistant")


def row_messages(row: dict, where: str) -> list[dict]:
    """The conversation of one row, checked: known roles, string contents, at least one assistant turn."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ChatforgeError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}}")
    elif "prompt" in row and "completion" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    else:
        raise ChatforgeError(f"{where}: a row needs \"messages\", or \"prompt\" and \"completion\" "
                             f"(has: {', '.join(row) or 'nothing'})")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ChatforgeError(f"{where}: message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ChatforgeError(f"{where}: message {i} needs a string \"content\"")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatforgeError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Every conversation of a .jsonl file, all validated up front (a bad row late in the file
    stops the run before training, not mid-epoch)."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{path}: no such file")
    conversations = [row_messages(row, f"{path}:{lineno}") for lineno, row in read_jsonl(path)]
    if not conversations:
        raise ChatforgeError(f"{path}: no rows")
    return conversations


def tokenize_conversation(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the ChatML rendering, and for each token whether the loss is taken on it.

    The whole string is encoded at once (exactly what apply_chat_template gives); the mask comes from
    character offsets: a token is trained on when it starts inside an assistant turn's content or is
    that turn's <|im_end|>."""
    text, spans = "", []
    for m in messages:
        text += f"{IM_START}{m['role']}\n"
        start = len(text)
        text += m["content"] + IM_END
        if m["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    enc = tok.encode(text, add_special_tokens=False)
    mask = [any(a <= s < b for a, b in spans) for s, _ in enc.offsets]
    return enc.ids, mask


def build_examples(tok: Tokenizer, conversations: list[list[dict]], context: int) -> tuple[list, int]:
    """(ids, mask) pairs that fit the context (+1 for the shifted target); over-long ones are skipped
    and counted, never cut mid-answer."""
    examples, skipped = [], 0
    for messages in conversations:
        ids, mask = tokenize_conversation(tok, messages)
        if len(ids) > context + 1:
            skipped += 1
            continue
        examples.append((ids, mask))
    return examples, skipped


def collate(examples: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and targets; targets are -100 where no loss is taken (prompt, padding).
    With right padding and causal attention no real token ever attends to a pad."""
    width = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        target = torch.tensor(ids[1:])
        y[i, :n] = torch.where(torch.tensor(mask[1:]), target, torch.tensor(-100))
    return x, y


def pad_batch(sequences: list[list[int]], pad_token: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, longest) and each sequence's true length, for heads on the last real token."""
    x = torch.full((len(sequences), max(map(len, sequences))), pad_token, dtype=torch.long)
    for i, ids in enumerate(sequences):
        x[i, : len(ids)] = torch.tensor(ids)
    return x.to(device), torch.tensor([len(s) for s in sequences], device=device)


class ExampleSampler:
    """Random batches of examples; batch i comes from an RNG seeded by (seed, i), so `position` is the
    whole state to checkpoint. Under torchrun every rank draws the same global batch and keeps its own
    stride of it (train/distributed.rank_slice)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self.position = n, batch_size, seed, 0

    def next_indices(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        return rank_slice(rng.choice(self.n, size=min(self.batch_size, self.n), replace=False).tolist())

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.seed = int(state["position"]), int(state["seed"])


def pad_id(tok: Tokenizer) -> int:
    return tok.token_to_id(PAD)
