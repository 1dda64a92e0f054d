"""PPO for RLHF (InstructGPT step 3; Schulman et al., 2017; Ziegler et al., 2019).

Each round: sample replies to a batch of prompts with the policy; score each whole reply with the reward
model (or a reward function); turn the score into per-token rewards with a KL penalty to the frozen
starting model; estimate advantages with GAE against the critic's values; then take `rl.epochs` passes
of clipped policy and value updates over minibatches. The critic starts as a copy of the reward model,
as in InstructGPT. One optimizer step of the shared training loop is one minibatch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from chatforge.config import Config, RLConfig
from chatforge.data.shards import WindowSampler, open_tokens
from chatforge.model.classifier import Classifier
from chatforge.model.io import load_run_model
from chatforge.stages.reward import load_reward_model
from chatforge.stages.rollout import RLRun, Round, sequence_logprobs
from chatforge.train.loop import train


def kl_penalised_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, kl_coef: float,
                         mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards (B, T): −β (log π − log π_ref) at every response token, plus the reward model's
    score at the last one (InstructGPT eq. 2, the KL spread over tokens as in Ziegler et al.)."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = mask.long().cumsum(-1).argmax(-1)  # index of each row's last response token
    rewards[torch.arange(len(score)), last] += score
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016, eq. 16) over (B, T), value 0 after the end:
    δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1};  returns = A + V."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries."""
    mean = (x * mask).sum() / mask.sum()
    var = (((x - mean) * mask) ** 2).sum() / mask.sum()
    return (x - mean) * torch.rsqrt(var + eps) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate (PPO eq. 7), negated to minimise: −E[min(ρA, clip(ρ, 1−ε, 1+ε)A)], ρ = π/π_old.
    Also returns the share of tokens where the clip was active."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip) * advantages
    loss = -(torch.minimum(unclipped, clipped) * mask).sum() / mask.sum()
    clip_fraction = ((clipped < unclipped).float() * mask).sum() / mask.sum()
    return loss, clip_fraction


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> torch.Tensor:
    """½ E[max((V − R)², (clip(V, V_old ± ε) − R)²)]: the value moves at most ε from the rollout's; with
    ε = 0, ½ E[(V − R)²], unclipped."""
    worst = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        worst = torch.maximum(worst, (clipped - returns) ** 2)
    return 0.5 * (worst * mask).sum() / mask.sum()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over reply tokens: 1 = the critic predicts the returns; ≤ 0 = no better
    than their mean."""
    def var(x: torch.Tensor) -> torch.Tensor:
        mean = (x * mask).sum() / mask.sum()
        return (((x - mean) * mask) ** 2).sum() / mask.sum()
    return float(1 - var(returns - values) / var(returns).clamp(min=1e-8))


class ActorCritic(nn.Module):
    """The policy and its critic, trained together by one optimizer. The critic is a reward model whose
    head reads every position: V(x≤t) estimates the return from token t on."""

    def __init__(self, policy: nn.Module, critic: Classifier):
        super().__init__()
        self.policy, self.critic = policy, critic

    def values(self, sequences: torch.Tensor) -> torch.Tensor:
        return self.critic.head(self.critic.body.hidden(sequences[:, :-1])).squeeze(-1).float()

    def flops_per_token(self) -> float:
        return self.policy.flops_per_token() + self.critic.body.flops_per_token()


def ppo_loss(m: ActorCritic, rnd: Round, idx: torch.Tensor, rl: RLConfig) -> tuple[torch.Tensor, dict]:
    """The loss of one minibatch of a round: clipped policy loss + value_coef × clipped value loss."""
    seqs, mask = rnd.sequences[idx], rnd.mask[idx]
    logp, entropy = sequence_logprobs(m.policy, seqs, with_entropy=True)
    pg, clip_fraction = policy_loss(logp, rnd.old_logp[idx], rnd.advantages[idx], mask, rl.clip)
    vf = value_loss(m.values(seqs), rnd.values[idx], rnd.returns[idx], mask, rl.value_clip)
    stats = {"policy_loss": pg.item(), "value_loss": vf.item(), "clip_fraction": clip_fraction.item(),
             "entropy": ((entropy * mask).sum() / mask.sum()).item()}
    return pg + rl.value_coef * vf, stats


def run_ppo(cfg: Config, policy_run: str | Path, prompts: str | Path, out: str | Path,
            reward_run: str | Path | None = None, val: str | Path | None = None,
            resume: str | None = None, reference_run: str | Path | None = None) -> dict:
    """PPO from `policy_run` against `reward_run` (or rl.reward), with the KL to `reference_run` (by
    default the starting model)."""
    out, rl = Path(out), cfg.rl
    run = RLRun(cfg, policy_run, prompts, reward_run, val, "ppo", reference_run)
    # InstructGPT starts the critic from the reward model; with a reward function, from the policy
    critic = load_reward_model(reward_run) if reward_run else Classifier(load_run_model(policy_run), 1)
    model = ActorCritic(run.policy, critic.to(run.device))

    @torch.no_grad()
    def prepare(rnd: Round) -> dict:
        model.eval()
        rnd.values = model.values(rnd.sequences) * rnd.mask
        model.train()
        scores = rnd.scores
        if rl.whiten_rewards:
            scores = (scores - scores.mean()) / (scores.std() + 1e-8)
        rewards = kl_penalised_rewards(scores, rnd.old_logp, rnd.ref_logp, run.kl.coef, rnd.mask)
        advantages, rnd.returns = gae(rewards, rnd.values, rl.gamma, rl.lam)
        rnd.advantages = whiten(advantages, rnd.mask)
        return {"explained_variance": explained_variance(rnd.values, rnd.returns, rnd.mask)}

    ptx = None
    if rl.ptx_coef > 0:  # PPO-ptx (InstructGPT eq. 2): keep the pre-training likelihood up too
        ptx = WindowSampler(open_tokens(cfg.data.dir, "train"), run.policy.cfg.context, cfg.train.batch_size,
                            cfg.train.seed)

    def loss(m: ActorCritic, rnd: Round, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        value, stats = ppo_loss(m, rnd, idx, rl)
        if ptx is not None:
            x, y = (torch.from_numpy(a).to(run.device) for a in ptx.next_batch())
            lm = m.policy(x, targets=y)
            value, stats = value + rl.ptx_coef * lm, stats | {"ptx_loss": lm.item()}
        return value, stats

    result = train(model, run.stage(prepare, loss), cfg, out, resume)
    return run.finish(out, result)
