"""Held-out scoring of a chat model on a task: does the reply end with <|im_end|> within the token budget,
and does the task's checker (its gold judge) accept it? A task plugs in as a reward does, by
`module:NAME` (`load_task`): the demo's are `chatforge.tasks.verse:TASK` and `chatforge.tasks.form:TASK`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from chatforge.data.readers import read_jsonl
from chatforge.errors import ChatforgeError
from chatforge.model.generate import Sampling
from chatforge.model.transformer import Transformer
from chatforge.stages.rollout import model_scores, sample_round


@dataclass
class Task:
    """A held-out task: `check(row, reply) -> bool` judges a reply to one of its prompt rows ({"prompt",
    ...}), and `group(row)`, when given, names the group whose success rate the row also counts in ("en" /
    "zh" for the demo's tasks: success_en, success_zh)."""

    check: Callable[[dict, str], bool]
    group: Callable[[dict], str] | None = None


def load_task(spec: str, group_field: str | None = None) -> Task:
    """`module:NAME`: a Task, or a checker function(row, reply) -> bool, whose success is then also split
    by the value of each row's `group_field` when one is given."""
    module_name, _, name = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), name) if module_name and name else None
    except ImportError as e:
        raise ChatforgeError(f"task '{spec}': cannot import {module_name} ({e})") from None
    except AttributeError:
        found = None
    if isinstance(found, Task):
        return found
    if not callable(found):
        raise ChatforgeError(f"task '{spec}' is not a Task or a function: give module:NAME, e.g. "
                             "chatforge.tasks.verse:TASK or mypackage.mytask:check")
    return Task(found, (lambda row: str(row.get(group_field))) if group_field else None)


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
def evaluate_task(model: Transformer, tok: Tokenizer, rows: list[dict], task: Task, max_new_tokens: int = 48,
                  temperature: float = 0.0, seed: int = 0, batch_size: int = 64,
                  reward_model: torch.nn.Module | None = None) -> dict:
    """Success rate (`task.check`) and end-token rate over `rows`, and the success of each of the task's
    groups ("success_{group}"); greedy by default so numbers repeat.
    Replies are generated `batch_size` prompts at a time; one ends when it emits <|im_end|>.
    With a `reward_model`, also its score of each reply ("scores", one per row: compare two models on the
    same rows by the mean difference, or by the win-rate of one over the other) and "rm_auc": how well those
    scores tell this model's successful replies from its failed ones (`ranking_auc`), which is what PPO
    against that reward model needs."""
    model.eval()
    ended, samples, scores, oks = 0, [], [], []  # oks: the checker's verdict on each row's reply
    by_group: dict[str, list[int]] = {}  # "en"/"zh": [successes, prompts]
    s = Sampling(temperature=temperature, max_new_tokens=max_new_tokens)
    for start in range(0, len(rows), batch_size):
        rnd = sample_round(model, tok, rows[start : start + batch_size], s, seed + start)
        if reward_model is not None:
            scores.append(model_scores(reward_model, tok, rnd))
        for row, text, done in zip(rnd.rows, rnd.texts, rnd.ended.tolist(), strict=True):
            ok = done and task.check(row, text)
            oks.append(bool(ok))
            ended += done
            if task.group is not None:
                tally = by_group.setdefault(task.group(row), [0, 0])
                tally[0] += ok
                tally[1] += 1
            if len(samples) < 6:
                samples.append({"prompt": row["prompt"], "reply": text, "ok": ok})
    n = max(1, len(rows))
    per_group = {f"success_{g}": s / c for g, (s, c) in sorted(by_group.items())}
    out = {"success": sum(oks) / n, "end_rate": ended / n, "n": len(rows), **per_group, "samples": samples}
    if scores:
        out["scores"] = torch.cat(scores)
        out["rm_auc"] = ranking_auc(out["scores"].tolist(), oks)
    return out


@torch.no_grad()
def pass_at_k(model: Transformer, tok: Tokenizer, rows: list[dict], task: Task, k: int = 8,
              temperature: float = 1.0, max_new_tokens: int = 48, seed: int = 0,
              reward_model: torch.nn.Module | None = None, batch_size: int = 32,
              more_reward_models: dict[str, torch.nn.Module] | None = None) -> dict:
    """k sampled replies to each row: pass@k (the share of prompts with at least one success; above greedy
    success, there are good replies in the model's distribution for RL to make more likely), the share of
    successful samples, and with a reward model "rm_auc": `ranking_auc` of its scores of these samples
    against the task's verdicts, which is how well it judges the policy's own replies. The samples'
    "verdicts" (and with a reward model their "scores"), k per row in row order, are kept for `best_of_n`.
    Each of `more_reward_models` ranks the same samples too: "{name}_auc"."""
    model.eval()
    judges = ({"rm": reward_model} if reward_model is not None else {}) | (more_reward_models or {})
    oks, passed, scores = [], 0, {name: [] for name in judges}
    s = Sampling(temperature=temperature, max_new_tokens=max_new_tokens)
    for start in range(0, len(rows), batch_size):
        rnd = sample_round(model, tok, rows[start : start + batch_size], s, seed + start, group_size=k)
        verdicts = [bool(done) and task.check(row, text)
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
