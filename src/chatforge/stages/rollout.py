"""What PPO and GRPO share: prompts, replies sampled in batches with the KV cache, their scores (from a
reward model or a reward function), and per-token log-probabilities under a model."""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer

from chatforge.config import Config
from chatforge.data.chat import ExampleSampler, pad_batch, pad_id, tokenize_conversation
from chatforge.data.readers import read_jsonl
from chatforge.errors import ChatforgeError
from chatforge.model.generate import Sampling, default_stop_ids, generate_batch
from chatforge.model.io import load_run_model, save_trained
from chatforge.model.logprob import token_logprobs
from chatforge.model.lora import apply_lora
from chatforge.stages.reward import as_messages, load_reward_model
from chatforge.tokenizer import decode, encode, load_tokenizer, render_chat
from chatforge.train.device import pick_device
from chatforge.train.distributed import mean_across_ranks, rank_world
from chatforge.train.loop import Stage, finish_run


@dataclass
class Round:
    """One round of rollouts: N replies, laid out as prompt + reply, right-padded."""

    rows: list[dict]  # the task row of each reply (a prompt repeated group_size times)
    texts: list[str]  # each reply, decoded, without its end token
    sequences: torch.Tensor  # (N, L) token ids
    mask: torch.Tensor  # (N, L-1) 1.0 where the target (the next token) is a reply token
    ended: torch.Tensor  # (N,) bool: the reply emitted <|im_end|> within the budget
    scores: torch.Tensor | None = None  # (N,) the reward of each whole reply
    old_logp: torch.Tensor | None = None  # (N, L-1) log π_old of each target token
    ref_logp: torch.Tensor | None = None  # (N, L-1) log π_ref
    advantages: torch.Tensor | None = None  # (N, L-1)
    values: torch.Tensor | None = None  # PPO: the critic's values at sampling time
    returns: torch.Tensor | None = None  # PPO: the critic's targets

    def __len__(self) -> int:
        return len(self.rows)


def prompt_ids(tok: Tokenizer, row: dict) -> list[int]:
    messages = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
    return encode(tok, render_chat(messages, add_generation_prompt=True))


def load_prompt_rows(path: str | Path, tok: Tokenizer, room: int) -> list[dict]:
    """Rows with a "prompt" (a string or a message list) and any extra fields the reward may use.
    Prompts that leave fewer than `room` tokens of context for the reply are skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{path}: no such file")
    rows, too_long = [], 0
    for lineno, row in read_jsonl(path):
        prompt = row.get("prompt")
        if not (isinstance(prompt, str) and prompt.strip()) and not isinstance(prompt, list):
            raise ChatforgeError(f"{path}:{lineno}: each row needs a non-empty \"prompt\" (a string or messages)")
        as_messages(prompt, "", f"{path}:{lineno}")  # validates a message list
        if len(prompt_ids(tok, row)) > room:
            too_long += 1
            continue
        rows.append(row)
    if too_long:
        print(f"{path}: skipped {too_long} prompts too long to leave room for a reply")
    if not rows:
        raise ChatforgeError(f"{path}: no usable prompts")
    return rows


def same_tokenizer(run_a: str | Path, run_b: str | Path) -> None:
    if load_tokenizer(run_a).to_str() != load_tokenizer(run_b).to_str():
        raise ChatforgeError(f"{run_a} and {run_b} use different tokenizers; the reward model and the reference "
                             "must share the policy's tokenizer (train them from the same base run)")


@torch.no_grad()
def sample_round(policy: torch.nn.Module, tok: Tokenizer, rows: list[dict], s: Sampling, seed: int,
                 group_size: int = 1) -> Round:
    """`group_size` replies to each row's prompt, sampled with `s` together in one batch."""
    device = next(policy.parameters()).device
    rows = [r for r in rows for _ in range(group_size)]
    prompts = [prompt_ids(tok, r) for r in rows]
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = policy.training
    policy.eval()
    replies = generate_batch(policy, prompts, s, default_stop_ids(tok), pad_id(tok), generator)
    policy.train(was_training)
    sequences = [p + r for p, (r, _) in zip(prompts, replies, strict=True)]
    x, lengths = pad_batch(sequences, pad_id(tok), device)
    mask = torch.zeros(x.shape[0], x.shape[1] - 1, device=device)
    for i, p in enumerate(prompts):
        mask[i, len(p) - 1 : int(lengths[i]) - 1] = 1.0  # targets p .. end are the reply's tokens
    texts = [decode(tok, r[:-1] if ended else r) for r, ended in replies]
    ended = torch.tensor([e for _, e in replies], device=device)
    return Round(rows=rows, texts=texts, sequences=x, mask=mask, ended=ended)


def sequence_logprobs(model: torch.nn.Module, sequences: torch.Tensor, with_entropy: bool = False):
    """log π(x_{t+1} | x≤t) at every position of whole sequences (N, L−1) (and the entropies)."""
    return token_logprobs(model, sequences[:, :-1], sequences[:, 1:], with_entropy=with_entropy)


@torch.no_grad()
def batched_logprobs(model: torch.nn.Module, sequences: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([sequence_logprobs(model, sequences[i : i + chunk]) for i in range(0, len(sequences), chunk)])
    model.train(was_training)
    return out


def load_reward_function(spec: str) -> Callable[..., float]:
    """`package.module:function`, called as function(prompt, response, **the row's other fields)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ChatforgeError(f"rl.reward must look like module:function, e.g. chatforge.tasks.verse:reward; "
                             f"got '{spec}'")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ChatforgeError(f"rl.reward '{spec}': cannot import it ({e})") from None
    if not callable(fn):
        raise ChatforgeError(f"rl.reward '{spec}' is not a function")
    return fn


def distinct_2(texts: list[str]) -> float:
    """Distinct bigrams over all bigrams of the replies (Li et al., 2016), a word or a Chinese character
    a unit: a policy collapsing to one template falls towards 0."""
    grams = []
    for text in texts:
        units = re.findall(r"[\u4e00-\u9fff]|[^\s\u4e00-\u9fff]+", text)
        grams += zip(units, units[1:], strict=False)
    return len(set(grams)) / max(1, len(grams))


def function_scores(fn: Callable[..., float], spec: str, rnd: Round) -> torch.Tensor:
    scores = []
    for row, text in zip(rnd.rows, rnd.texts, strict=True):
        extra = {k: v for k, v in row.items() if k != "prompt"}
        try:
            value = fn(row["prompt"], text, **extra)
        except Exception as e:  # the user's code: name it and the prompt, not a deep stack trace
            raise ChatforgeError(f"reward function {spec} raised {type(e).__name__}: {e} "
                                 f"(prompt {str(row['prompt'])[:80]!r})") from None
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ChatforgeError(f"reward function {spec} returned {value!r} for prompt {str(row['prompt'])[:80]!r};"
                                 " it must return a finite number")
        scores.append(float(value))
    return torch.tensor(scores, device=rnd.sequences.device)


def load_scorer(policy_run: str | Path, tok: Tokenizer, reward_run: str | Path | None = None,
                reward_fn: str = "") -> tuple[Callable[[Round], torch.Tensor], torch.nn.Module | None]:
    """The reward of each reply of a round: the function `reward_fn` (module:function) when given, else the
    reward model in `reward_run`, which must share the policy's tokenizer. Also returns that reward model
    (None for a function), for the caller to place on its device."""
    if reward_run:
        same_tokenizer(policy_run, reward_run)
    if reward_fn:
        fn = load_reward_function(reward_fn)
        return (lambda rnd: function_scores(fn, reward_fn, rnd)), None
    reward_model = load_reward_model(reward_run).eval()
    return (lambda rnd: model_scores(reward_model, tok, rnd)), reward_model


@torch.no_grad()
def model_scores(reward_model: torch.nn.Module, tok: Tokenizer, rnd: Round, chunk: int = 64) -> torch.Tensor:
    """The reward model's score of each (prompt, reply), tokenized exactly as its training pairs were."""
    device = rnd.sequences.device
    context = reward_model.body.cfg.context  # a long prompt + an unended reply may not fit: keep the end,
    conversations = [tokenize_conversation(tok, as_messages(r["prompt"], t, "rollout"))[0][-context:]
                     for r, t in zip(rnd.rows, rnd.texts, strict=True)]  # where the score is read
    out = []
    for i in range(0, len(conversations), chunk):
        x, n = pad_batch(conversations[i : i + chunk], pad_id(tok), device)
        out.append(reward_model(x, n).squeeze(-1).float())
    return torch.cat(out)


def minibatches(n: int, size: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """Index sets for `epochs` shuffled passes over n rollouts."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        out += [order[i : i + size] for i in range(0, n, size)]
    return out


class AdaptiveKL:
    """β ← β (1 + K_β e), e = clip(KL/KL_target − 1, ±0.2), K_β = replies/horizon (Ziegler et al., 2019, §2.2).
    With no target, β stays fixed. With `per_score_std`, β is in units of the reward's spread: the first
    round multiplies it by the std of its scores, so how far the policy may go from the reference does not
    depend on a reward model's scale, which Bradley-Terry leaves to its training (σ 3.7 to 6.8 over six demo runs)."""

    def __init__(self, coef: float, target: float, horizon: int, per_score_std: bool = False):
        self.coef, self.target, self.horizon, self.unscaled = coef, target, horizon, per_score_std

    def scale(self, score_std: float) -> None:
        if self.unscaled and math.isfinite(score_std) and score_std > 0:  # all alike (σ = 0): β as given
            self.coef = self.coef * score_std
        self.unscaled = False

    def update(self, kl: float, replies: int) -> None:
        if self.target > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.coef *= 1 + error * replies / self.horizon


class RLRun:
    """What PPO and GRPO set up alike: the policy and its frozen reference (both the starting model), the
    prompts, the reward (a reward model or a function), the KL coefficient, and rounds of rollouts served
    to the shared training loop one minibatch at a time."""

    def __init__(self, cfg: Config, init: str | Path, prompts: str | Path, reward_run: str | Path | None,
                 val: str | Path | None, name: str, reference: str | Path | None = None):
        self.cfg, self.rl, self.init, self.name = cfg, cfg.rl, init, name
        if not reward_run and not self.rl.reward:
            raise ChatforgeError(f"{name} needs a reward: --reward RUN (a reward model) or module:function")
        self.tok = load_tokenizer(init)
        if reference:
            same_tokenizer(init, reference)
        torch.manual_seed(cfg.train.seed)
        # the KL anchor: the starting model, or (a later round of iterated RLHF) the SFT model it came from
        self.policy, self.reference = load_run_model(init), load_run_model(reference or init)
        self.reference.requires_grad_(False)  # the KL anchor never moves
        cfg.model = self.policy.cfg
        room = self.policy.cfg.context - self.rl.max_new_tokens
        self.rows = load_prompt_rows(prompts, self.tok, room)
        self.val_rows = load_prompt_rows(val, self.tok, room)[:64] if val else []
        self.score, self.reward_model = load_scorer(init, self.tok, reward_run, self.rl.reward)
        self.gold = load_reward_function(self.rl.gold) if self.rl.gold else None
        if cfg.lora.r > 0:
            apply_lora(self.policy, cfg.lora)
        self.device = pick_device(cfg.train.device)
        for m in (self.policy, self.reference, self.reward_model):
            if m is not None:
                m.to(self.device)
        self.sampling = Sampling(temperature=self.rl.temperature, top_p=self.rl.top_p,
                                 max_new_tokens=self.rl.max_new_tokens)
        self.kl = AdaptiveKL(self.rl.kl_coef, self.rl.kl_target, self.rl.kl_horizon, self.rl.kl_per_score_std)
        self.sampler = ExampleSampler(len(self.rows), self.rl.prompts_per_rollout, cfg.train.seed)
        self.round: Round | None = None
        self.batches: list[torch.Tensor] = []
        self.round_stats: dict = {}
        self.step_stats: dict = {}

    @torch.no_grad()
    def sample(self) -> Round:
        """A new round: replies from the current policy, their scores (less the penalty for never ending),
        and the log-probs of the policy that sampled them (π_old) and of the reference."""
        rows = [self.rows[i] for i in self.sampler.next_indices()]
        # each round its own sampling stream, and under torchrun each rank its own
        seed = self.cfg.train.seed * 100003 + self.sampler.position + 7919 * rank_world()[0]
        rnd = sample_round(self.policy, self.tok, rows, self.sampling, seed, self.rl.group_size)
        rnd.scores = self.score(rnd) - self.rl.no_end_penalty * (~rnd.ended).float()
        rnd.old_logp = batched_logprobs(self.policy, rnd.sequences)
        rnd.ref_logp = batched_logprobs(self.reference, rnd.sequences)
        return rnd

    def stage(self, prepare: Callable[[Round], dict], loss: Callable[..., tuple[torch.Tensor, dict]]) -> Stage:
        """`prepare` fills in a new round's advantages and returns its numbers; `loss(model, round, idx)` is
        the loss of one minibatch and its numbers."""

        def next_batch() -> tuple[Round, torch.Tensor]:
            if not self.batches:
                self.round = self.sample()
                if self.kl.unscaled:  # rl.kl_per_score_std: β σ, from the first round's scores
                    self.kl.scale(mean_across_ranks(self.round.scores.std().item()))
                kl = ((self.round.old_logp - self.round.ref_logp) * self.round.mask).sum(-1).mean().item()
                kl = mean_across_ranks(kl)  # every rank adapts the KL coefficient the same way
                reward = mean_across_ranks(self.round.scores.mean().item())
                self.round_stats = {"reward": reward, "kl": kl, "kl_coef": self.kl.coef,
                                    "reply_tokens": self.round.mask.sum(-1).mean().item(),
                                    "end_rate": self.round.ended.float().mean().item(),
                                    "distinct_2": distinct_2(self.round.texts), **prepare(self.round)}
                if self.gold is not None:  # watched, never optimised
                    gold = function_scores(self.gold, self.rl.gold, self.round).mean().item()
                    self.round_stats["gold"] = mean_across_ranks(gold)
                self.kl.update(kl, len(self.round))
                size = max(1, self.cfg.train.batch_size // rank_world()[1])  # batch_size: replies of all ranks
                self.batches = minibatches(len(self.round), size, self.rl.epochs,
                                           self.cfg.train.seed + self.sampler.position)
            return self.round, self.batches.pop(0)

        def step_loss(m: torch.nn.Module, batch: tuple[Round, torch.Tensor]) -> torch.Tensor:
            rnd, idx = batch
            value, self.step_stats = loss(m, rnd, idx)
            return value

        stage = Stage(name=self.name, next_batch=next_batch, loss=step_loss,
                      tokens=lambda batch: batch[0].sequences[batch[1]].numel(),  # padded: what it computes
                      evaluate=self.evaluate if self.val_rows else None,
                      data_state=self.data_state, load_data_state=self.load_data_state,
                      metrics=lambda: {**self.round_stats, **self.step_stats}, ddp_wrap=False)
        return stage

    def data_state(self) -> dict:
        return {**self.sampler.state_dict(), "kl_coef": self.kl.coef, "kl_unscaled": self.kl.unscaled}

    def load_data_state(self, state: dict) -> None:
        """On resume a fresh round is sampled, by the restored policy, from where the prompts had got to."""
        self.sampler.load_state_dict(state)
        self.kl.coef, self.kl.unscaled = float(state["kl_coef"]), bool(state.get("kl_unscaled", False))
        self.batches = []

    def evaluate(self, _model: torch.nn.Module) -> dict:
        """Held-out prompts: the mean reward of greedy replies, and the KL (nats per reply) of sampled
        replies to the reference."""
        greedy = sample_round(self.policy, self.tok, self.val_rows, replace(self.sampling, temperature=0.0), seed=0)
        sampled = sample_round(self.policy, self.tok, self.val_rows, self.sampling, seed=0)
        kl = ((batched_logprobs(self.policy, sampled.sequences) - batched_logprobs(self.reference, sampled.sequences))
              * sampled.mask).sum(-1).mean().item()
        return {"val_reward": self.score(greedy).mean().item(), "val_end_rate": greedy.ended.float().mean().item(),
                "val_kl": kl}

    def finish(self, out: Path, result: dict) -> dict:
        summary = {**result, "prompts": len(self.rows), "kl_coef": self.kl.coef}
        return finish_run(out, lambda: save_trained(self.policy, self.cfg.lora, self.init, out, self.name), summary)
