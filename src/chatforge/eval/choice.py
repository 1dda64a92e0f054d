"""Multiple-choice evaluation by log-likelihood, the way lm-evaluation-harness scores HellaSwag or ARC.

The model does not write an answer; each choice is scored by how likely the model finds it after the
question, and the most likely choice is the model's answer:

    acc = mean_i [ argmax_j sum_t log p(c_ij,t | q_i, c_ij,<t) == a_i ]

for question q_i, choices c_ij (token by token) and right answer a_i. `accuracy_norm` divides each
choice's sum by its length in UTF-8 bytes first, so long choices are not punished for having more tokens
(lm-eval's acc_bytes; the same as its acc_norm, which counts characters, for ASCII choices).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from chatforge.data.readers import read_jsonl
from chatforge.errors import ChatforgeError
from chatforge.model.logprob import token_logprobs
from chatforge.model.transformer import Transformer
from chatforge.tokenizer import EOT, encode


def load_choices(path: str | Path) -> list[dict]:
    """Rows {"question": str, "choices": [str, ...], "answer": int} of a .jsonl file, checked line by line
    (extra keys are kept)."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{path}: no such file")
    rows = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row.get("question"), str):
            raise ChatforgeError(f'{where}: "question" must be a string (has: {", ".join(row) or "nothing"})')
        choices = row.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            got = "no such key" if choices is None else f"got {json.dumps(choices)[:80]}"
            raise ChatforgeError(f'{where}: "choices" must be a list of strings ({got})')
        if len(choices) < 2:
            raise ChatforgeError(f'{where}: "choices" has {len(choices)} choice(s); a question needs at least 2')
        answer = row.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise ChatforgeError(f'{where}: "answer" must be the index of the right choice (an integer), '
                                 f"got {answer!r}")
        if not 0 <= answer < len(choices):
            raise ChatforgeError(f'{where}: "answer" is {answer} but there are {len(choices)} choices '
                                 f"(0..{len(choices) - 1})")
        rows.append(row)
    if not rows:
        raise ChatforgeError(f'{path}: no questions; write one JSON object a line: {{"question", "choices", "answer"}}')
    return rows


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, encoded apart (lm-eval's convention: trailing spaces of the
    context move to the continuation, so " Paris" is one word token, not a space then "Paris").
    An empty context becomes <|endoftext|>, so the first token of the continuation has something to follow."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = encode(tok, context) or [tok.token_to_id(EOT)]
    return ctx, encode(tok, continuation)


@torch.no_grad()
def continuation_logprobs(model: Transformer, pairs: list[tuple[list[int], list[int]]],
                          batch_size: int = 32) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): sum_t log p(cont_t | context, cont_<t) and whether every
    continuation token is the model's argmax (greedy) choice. Sequences longer than the model's context
    lose their oldest context tokens. Rows are right-padded into batches, longest first; causal attention
    means pads after a row's last token cannot change its numbers."""
    limit = model.cfg.context
    device = next(model.parameters()).device
    seqs = []
    for ctx, cont in pairs:
        if not ctx:
            raise ValueError("a context needs at least one token (use <|endoftext|> for none)")
        if len(cont) > limit:
            raise ChatforgeError(f"a continuation of {len(cont)} tokens does not fit the model's context ({limit})")
        seqs.append(((list(ctx) + list(cont))[-(limit + 1):][:-1], list(cont)))  # inputs predict the next token
    was_training = model.training
    model.eval()
    out: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs = torch.zeros((len(batch), len(seqs[batch[0]][0])), dtype=torch.long)
        targets = torch.full_like(inputs, -100)  # only the continuation's tokens are scored
        for row, i in enumerate(batch):
            inp, cont = seqs[i]
            inputs[row, : len(inp)] = torch.tensor(inp)
            targets[row, len(inp) - len(cont) : len(inp)] = torch.tensor(cont, dtype=torch.long)
        logp, greedy = token_logprobs(model, inputs.to(device), targets.to(device), with_greedy=True)
        scored = targets.to(device) != -100
        for row, i in enumerate(batch):
            if seqs[i][1]:
                out[i] = (float(logp[row].sum()), bool(greedy[row][scored[row]].all()))
    model.train(was_training)
    return out


def choice_accuracy(model: Transformer, tok: Tokenizer, rows: list[dict], batch_size: int = 32) -> dict:
    """Accuracy of picking the most likely choice (see the module docstring), length-normalised accuracy,
    the number of questions and the accuracy of guessing at random."""
    pairs, spans = [], []
    for row in rows:
        spans.append((len(pairs), len(pairs) + len(row["choices"])))
        pairs += [encode_pair(tok, row["question"], c) for c in row["choices"]]
    scores = [lp for lp, _ in continuation_logprobs(model, pairs, batch_size)]
    right = right_norm = 0
    for row, (a, b) in zip(rows, spans, strict=True):
        lls = scores[a:b]
        norm = [ll / max(1, len(c.encode("utf-8"))) for ll, c in zip(lls, row["choices"], strict=True)]
        right += max(range(len(lls)), key=lls.__getitem__) == row["answer"]
        right_norm += max(range(len(norm)), key=norm.__getitem__) == row["answer"]
    n = len(rows)
    return {"accuracy": right / max(1, n), "accuracy_norm": right_norm / max(1, n), "n": n,
            "chance": sum(1 / len(r["choices"]) for r in rows) / max(1, n)}
