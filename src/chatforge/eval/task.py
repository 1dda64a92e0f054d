"""Held-out scoring of a chat model on the demo task: does the reply end with <|im_end|> within the
token budget, and does the constraint checker accept it?"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer

from chatforge.data.readers import read_jsonl
from chatforge.model.generate import Sampling
from chatforge.model.transformer import Transformer
from chatforge.stages.rollout import model_scores, sample_round
from chatforge.tasks.verse import check


def ranking_auc(scores: list[float], labels: list[bool]) -> float | None:
    """The probability that a random successful reply outscores a random failed one (ties count half):
    the area under the ROC curve of `scores` as a success detector. 0.5 = blind; None without both kinds."""
    good = [s for s, ok in zip(scores, labels, strict=True) if ok]
    bad = [s for s, ok in zip(scores, labels, strict=True) if not ok]
    if not good or not bad:
        return None
    wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
    return wins / (len(good) * len(bad))


@torch.no_grad()
def evaluate_task(model: Transformer, tok: Tokenizer, rows: list[dict], max_new_tokens: int = 48,
                  temperature: float = 0.0, seed: int = 0, batch_size: int = 64,
                  reward_model: torch.nn.Module | None = None, checker: Callable[[dict, str], bool] = check) -> dict:
    """Success rate (checker) and end-token rate over `rows`, and success by language (success_en,
    success_zh, from each row's "kind", or its suffix: "form_zh" is Chinese); greedy by default so numbers repeat.
    Replies are generated `batch_size` prompts at a time; one ends when it emits <|im_end|>.
    With a `reward_model`, also its score of each reply ("scores", one per row: compare two models on the
    same rows by the mean difference, or by the win-rate of one over the other) and "rm_auc": how well those
    scores tell this model's successful replies from its failed ones (`ranking_auc`), which is what PPO
    against that reward model needs. `checker(row, reply)` is the gold judge (the verse task's by default)."""
    model.eval()
    ended, samples, scores, oks = 0, [], [], []  # oks: the checker's verdict on each row's reply
    by_kind: dict[str, list[int]] = {}  # "en"/"zh": [successes, prompts]
    s = Sampling(temperature=temperature, max_new_tokens=max_new_tokens)
    for start in range(0, len(rows), batch_size):
        rnd = sample_round(model, tok, rows[start : start + batch_size], s, seed + start)
        if reward_model is not None:
            scores.append(model_scores(reward_model, tok, rnd))
        for row, text, done in zip(rnd.rows, rnd.texts, rnd.ended.tolist(), strict=True):
            ok = done and checker(row, text)
            oks.append(bool(ok))
            ended += done
            lang = row.get("kind", "all").rsplit("_", 1)[-1]  # "en", "zh", and a task's "form_en", "form_zh"
            tally = by_kind.setdefault(lang, [0, 0])
            tally[0] += ok
            tally[1] += 1
            if len(samples) < 6:
                samples.append({"prompt": row["prompt"], "reply": text, "ok": ok})
    n = max(1, len(rows))
    per_kind = {f"success_{k}": s / c for k, (s, c) in sorted(by_kind.items()) if k in ("en", "zh")}
    out = {"success": sum(oks) / n, "end_rate": ended / n, "n": len(rows), **per_kind, "samples": samples}
    if scores:
        out["scores"] = torch.cat(scores)
        out["rm_auc"] = ranking_auc(out["scores"].tolist(), oks)
    return out


@torch.no_grad()
def pass_at_k(model: Transformer, tok: Tokenizer, rows: list[dict], k: int = 8, temperature: float = 1.0,
              max_new_tokens: int = 48, seed: int = 0, checker: Callable[[dict, str], bool] = check,
              reward_model: torch.nn.Module | None = None, batch_size: int = 32,
              more_reward_models: dict[str, torch.nn.Module] | None = None) -> dict:
    """k sampled replies to each row: pass@k (the share of prompts with at least one success; above greedy
    success, there are good replies in the model's distribution for RL to make more likely), the share of
    successful samples, and with a reward model "rm_auc": `ranking_auc` of its scores of these samples
    against the checker's verdicts, which is how well it judges the policy's own replies. The samples'
    "verdicts" (and with a reward model their "scores"), k per row in row order, are kept for `best_of_n`.
    Each of `more_reward_models` ranks the same samples too: "{name}_auc"."""
    model.eval()
    judges = ({"rm": reward_model} if reward_model is not None else {}) | (more_reward_models or {})
    oks, passed, scores = [], 0, {name: [] for name in judges}
    s = Sampling(temperature=temperature, max_new_tokens=max_new_tokens)
    for start in range(0, len(rows), batch_size):
        rnd = sample_round(model, tok, rows[start : start + batch_size], s, seed + start, group_size=k)
        verdicts = [bool(done) and checker(row, text)
                    for row, text, done in zip(rnd.rows, rnd.texts, rnd.ended.tolist(), strict=True)]
        passed += sum(any(verdicts[i : i + k]) for i in range(0, len(verdicts), k))
        oks += verdicts
        for name, judge in judges.items():
            scores[name] += model_scores(judge, tok, rnd).tolist()
    out = {f"pass_at_{k}": passed / max(1, len(rows)), "sample_success": sum(oks) / max(1, len(oks)),
           "verdicts": oks}
    out |= {f"{name}_auc": ranking_auc(values, oks) for name, values in scores.items()}
    if reward_model is not None:
        out["scores"] = scores["rm"]
    return out


def best_of_n(scores: list[float], verdicts: list[bool], k: int, n: int) -> tuple[float, float]:
    """Best-of-n against a reward model, from k ≥ n samples per prompt: keep the reply it scores highest of
    each prompt's first n. Returns (gold success, mean reward-model score) of the kept replies; its KL to the
    sampling policy is log n − (n−1)/n (Stiennon et al., 2020; Gao et al., 2022)."""
    gold = proxy = 0.0
    prompts = len(scores) // k
    for i in range(0, len(scores), k):
        best = max(range(i, i + n), key=lambda j: scores[j])
        gold, proxy = gold + verdicts[best], proxy + scores[best]
    return gold / prompts, proxy / prompts


def load_prompts(path: str) -> list[dict]:
    """Task rows ({"prompt", "keyword", "kind", "length", ...}) from a .jsonl file."""
    return [row for _, row in read_jsonl(Path(path))]
