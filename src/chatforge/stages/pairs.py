"""Preference pairs from the policy's own samples: on-policy data for DPO (and for a reward model).

For each prompt, sample `rl.group_size` replies from the policy, score them with a reward function or a
reward model (the labeller), and keep the best reply as "chosen" and the worst as "rejected" when their
scores differ; or, with `per_group` > 1, up to that many pairs of a higher- and a lower-scored reply, as
InstructGPT takes all K-choose-2 comparisons of a ranking. This is InstructGPT's comparison data (labellers
rank K samples of the SFT model, §3.5),
with a program or a reward model in the labeller's place, and what "online" and "iterative" DPO feed
DPO instead of a fixed human dataset (Xiong et al., 2024; Guo et al., 2024).

Why it matters: DPO on fixed pairs moves the log-probabilities of replies the policy would never write;
pairs of its own replies move the ones it does write, the same ones PPO and GRPO learn from.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from chatforge.errors import ChatforgeError
from chatforge.model.generate import Sampling
from chatforge.model.io import load_run_model
from chatforge.stages.rollout import Round, load_prompt_rows, load_scorer, sample_round
from chatforge.tokenizer import load_tokenizer


def best_and_worst(rnd: Round, scores: torch.Tensor, group_size: int, per_group: int = 1,
                   seed: int = 0) -> list[dict]:
    """{"prompt", "chosen", "rejected"} pairs of each group's ended replies (a reply cut off by the token
    budget is not a whole answer, so it is never part of a pair): per_group = 1, the best against the worst
    when they score differently; more, up to that many of all the (higher, lower) pairs, a seeded sample."""
    pairs, rng = [], random.Random(seed)
    for start in range(0, len(rnd.rows), group_size):
        ok = [i for i in range(start, start + group_size) if bool(rnd.ended[i]) and rnd.texts[i].strip()]
        if per_group == 1 and ok:
            ok = [max(ok, key=lambda i: float(scores[i])), min(ok, key=lambda i: float(scores[i]))]
        ordered = [(a, b) for a in ok for b in ok if float(scores[a]) > float(scores[b])
                   and rnd.texts[a] != rnd.texts[b]]
        for a, b in rng.sample(ordered, min(per_group, len(ordered))):
            pairs.append({"prompt": rnd.rows[start]["prompt"], "chosen": rnd.texts[a], "rejected": rnd.texts[b]})
    return pairs


def sample_pairs(policy: torch.nn.Module, tok, rows: list[dict], s: Sampling, group_size: int,
                 score: Callable[[Round], torch.Tensor], seed: int = 0, prompts_per_batch: int = 32,
                 per_group: int = 1) -> list[dict]:
    from tqdm import tqdm

    pairs = []
    for start in tqdm(range(0, len(rows), prompts_per_batch), desc="pairs", unit="batch"):
        rnd = sample_round(policy, tok, rows[start : start + prompts_per_batch], s, seed + start, group_size)
        pairs += best_and_worst(rnd, score(rnd), group_size, per_group, seed + start)
    return pairs


def run_pairs(policy_run: str | Path, prompts: str | Path, reward: str, out: str | Path, group_size: int = 4,
              temperature: float = 1.0, max_new_tokens: int = 40, limit: int | None = None, seed: int = 0,
              per_group: int = 1) -> dict:
    """Write pairs of `policy_run`'s replies to `prompts` (a task-prompt .jsonl) to `out` (.jsonl).
    `reward` is a module:function (called with the prompt, the reply and the row's other fields) or a
    reward-model run folder."""
    if group_size < 2:
        raise ChatforgeError(f"pairs: group_size must be at least 2 (got {group_size}): a pair needs two replies")
    torch.manual_seed(seed)
    tok = load_tokenizer(policy_run)
    policy = load_run_model(policy_run)
    rows = load_prompt_rows(prompts, tok, policy.cfg.context - max_new_tokens)[:limit]
    is_run = Path(reward).is_dir()
    score, _ = load_scorer(policy_run, tok, reward if is_run else None, "" if is_run else reward)
    s = Sampling(temperature=temperature, max_new_tokens=max_new_tokens)
    pairs = sample_pairs(policy, tok, rows, s, group_size, score, seed, per_group=per_group)
    if not pairs:
        raise ChatforgeError(f"pairs: no group of {group_size} replies had two different scores; "
                             "sample more replies per prompt (--group) or at a higher --temperature")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return {"prompts": len(rows), "pairs": len(pairs)}
