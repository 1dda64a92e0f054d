"""Held-out scoring of a chat model on the demo task: does the reply end with <|im_end|> within the
token budget, and does the constraint checker accept it?"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from chatforge.data.chat import pad_id
from chatforge.data.readers import read_jsonl
from chatforge.model.generate import Sampling, generate_batch, generate_ids
from chatforge.model.transformer import Transformer
from chatforge.tasks.verse import check
from chatforge.tokenizer import EOT, IM_END, decode, encode, render_chat


def reply(model: Transformer, tok: Tokenizer, prompt: str, s: Sampling) -> tuple[str, bool]:
    """The assistant's reply to one user prompt, and whether it ended with <|im_end|> (or <|endoftext|>)."""
    ids = encode(tok, render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True))
    stops = {tok.token_to_id(IM_END), tok.token_to_id(EOT)}
    new = []
    for token in generate_ids(model, ids, s):
        if token in stops:
            return decode(tok, new), True
        new.append(token)
    return decode(tok, new), False


@torch.no_grad()
def evaluate_task(model: Transformer, tok: Tokenizer, rows: list[dict], max_new_tokens: int = 48,
                  temperature: float = 0.0, seed: int = 0, batch_size: int = 64) -> dict:
    """Success rate (checker) and end-token rate over `rows`; greedy by default so numbers repeat.
    Replies are generated `batch_size` prompts at a time."""
    model.eval()
    successes, ended, samples = 0, 0, []
    stops = {tok.token_to_id(IM_END), tok.token_to_id(EOT)}
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    s = Sampling(temperature=temperature, max_new_tokens=max_new_tokens)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        chats = [render_chat([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True) for r in chunk]
        prompts = [encode(tok, text) for text in chats]
        replies = generate_batch(model, prompts, s, stops, pad_id(tok), generator)
        for row, (ids, done) in zip(chunk, replies, strict=True):
            text = decode(tok, ids[:-1] if done else ids)
            ok = done and check(row, text)
            successes += ok
            ended += done
            if len(samples) < 6:
                samples.append({"prompt": row["prompt"], "reply": text, "ok": ok})
    n = max(1, len(rows))
    return {"success": successes / n, "end_rate": ended / n, "n": len(rows), "samples": samples}


def load_prompts(path: str) -> list[dict]:
    """Task rows ({"prompt", "keyword", "kind", "length", ...}) from a .jsonl file."""
    return [row for _, row in read_jsonl(Path(path))]


@torch.no_grad()
def reward_model_scores(model: Transformer, reward_model: torch.nn.Module, tok: Tokenizer, rows: list[dict],
                        max_new_tokens: int = 48) -> torch.Tensor:
    """The reward model's score of `model`'s greedy reply to each row's prompt (compare two models on the
    same rows: the mean difference, or the win-rate of one over the other)."""
    from chatforge.config import RLConfig
    from chatforge.stages.rollout import model_scores, sample_round

    rnd = sample_round(model, tok, rows, RLConfig(temperature=0.0, max_new_tokens=max_new_tokens), seed=0)
    return model_scores(reward_model, tok, rnd)
